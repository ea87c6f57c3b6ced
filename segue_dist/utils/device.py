"""The one device choice: what ``--device`` / ``device:`` settings mean everywhere (protect, evaluate, cluster), and
how many CPU cores a process may use."""

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


def cpus_per_process() -> int:
    """CPU cores this process may use: its affinity mask (what a cgroup, taskset or Slurm allotment leaves it),
    shared evenly with the other processes of the job on this node (``LOCAL_WORLD_SIZE``, set by torchrun and so by
    ``accelerate launch``). At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_world))


def capped_workers(requested: int) -> int:
    """DataLoader worker processes for a process that asks for ``requested``: at most its share of the cores.

    A config written for a bigger machine (``data.num_workers: 4``) would otherwise start more loader processes than
    the node has cores for (torch warns when one process asks for more workers than cores; two launched processes
    of 2 workers each on 2 cores oversubscribe them without a warning). ``0`` (load in the main process) stays 0.
    """
    return min(max(0, requested), cpus_per_process())
