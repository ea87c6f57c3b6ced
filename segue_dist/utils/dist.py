"""Rank and world size from the launcher's environment, usable before (or without) torch.distributed."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from segue_dist.utils.device import best_device  # noqa: F401 - re-exported: callers import it from here


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_if_launched(backend: str | None = None) -> bool:
    """Join the process group when started by torchrun/accelerate (WORLD_SIZE > 1); gloo on CPU, nccl on GPU."""
    if world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
