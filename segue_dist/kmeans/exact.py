"""Exact, order-independent reductions: collectives (no-ops in one process) and 64-bit fixed-point sums.

Integer addition is associative, so sums of fixed-point values are the same whatever the order of atomics,
threads or ranks; that is what makes the torch backend bitwise identical under any sharding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

# Fixed-point sums are kept below 2**62 so that the rounding slack (n/2) cannot overflow int64.
_FIXED_POINT_HEADROOM_BITS = 62


class LocalComm:
    world_size = 1
    rank = 0

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        return [list(values)]


class DistComm(LocalComm):
    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        # NCCL only moves CUDA tensors; everything else (gloo, mpi, mixed 'cpu:gloo,cuda:nccl') takes CPU tensors.
        if "nccl" in backend and "gloo" not in backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        buf = t.to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return buf.to(t.device)

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return [o.cpu().tolist() for o in out]


# --------------------------------------------------------------------------------------------------------------
# Exact (order-independent) sums through 64-bit fixed point.


def fixed_point_scale(bound: float) -> float:
    """Power of two s such that n values of magnitude <= bound/n, scaled by s and rounded, sum below 2**62."""
    if not math.isfinite(bound) or bound <= 0.0:
        return 1.0
    exponent = math.floor(_FIXED_POINT_HEADROOM_BITS - math.log2(bound))
    return math.ldexp(1.0, max(-1000, min(1000, exponent)))


def quantise(t: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.round(t.double() * scale).long()
