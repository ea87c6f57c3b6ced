"""The one device choice: what ``--device`` / ``device:`` settings mean everywhere (protect, evaluate, cluster)."""

from __future__ import annotations

import os

import torch


def best_device() -> torch.device:
    """This process's GPU when CUDA is present (``LOCAL_RANK`` modulo the visible GPUs), else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def resolve_device(choice: str = "auto") -> torch.device:
    """A device from a user's setting.

    ``""`` or ``"auto"``: :func:`best_device`. ``"cpu"``: the CPU. ``"cuda"``: this rank's GPU (as ``auto`` when
    CUDA is present). ``"cuda:N"``: that GPU. Any other torch device string (``"mps"``) is passed to
    ``torch.device``. Raises ``ValueError`` when CUDA is asked for and not available, so a launch on the wrong
    machine fails at once with a one-line message instead of deep inside the first forward.
    """
    if choice in ("", "auto"):
        return best_device()
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {choice} asked for, but CUDA is not available here")
        return torch.device(choice) if ":" in choice else best_device()
    return torch.device(choice)
