"""Input rows and score blocks: host arrays (numpy, memmaps, any float dtype) are streamed block by block and
converted to float32 on the way, so a large feature file is never copied whole.

`scan_rows` is the one input check every backend runs before clustering (NaN/inf, and the magnitudes that fix
the torch backend's fixed-point scales).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segue_dist.kmeans.config import DEFAULT_CHUNK_BYTES, ArrayLike
from segue_dist.kmeans.exact import LocalComm


class Rows:
    """Read-only view of an (n, d) float matrix held in numpy or a torch tensor on any device."""

    def __init__(self, x: ArrayLike, *, allow_empty: bool = False) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if not x.is_floating_point():
                raise ValueError(f"x must hold floating-point features, got dtype {x.dtype}")
        elif isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"x must hold floating-point features, got dtype {x.dtype}")
        else:
            raise TypeError(f"x must be a numpy array or a torch tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D (N, D), got shape {tuple(x.shape)}")
        n, d = int(x.shape[0]), int(x.shape[1])
        if d < 1 or (n < 1 and not allow_empty):
            raise ValueError(f"x must have at least one row and one column, got shape {(n, d)}")
        self.x = x
        self.n = n
        self.d = d

    @property
    def is_cuda(self) -> bool:
        return isinstance(self.x, torch.Tensor) and self.x.is_cuda

    def copy_into(self, dst: torch.Tensor, start: int, stop: int) -> None:
        """dst[:] = x[start:stop] as float32 (dst is a float32 tensor on the compute device)."""
        src = self.x[start:stop]
        if isinstance(src, np.ndarray):
            if dst.device.type == "cpu":
                dst.numpy()[...] = src  # numpy converts dtype and accepts read-only sources without a copy
                return
            src = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32))
        dst.copy_(src)

    def gather(self, rows: np.ndarray | None, device: torch.device) -> torch.Tensor:
        """float32 copy of x[rows] (all rows when None) on device."""
        if isinstance(self.x, torch.Tensor):
            t = self.x if rows is None else self.x[torch.as_tensor(rows, device=self.x.device)]
            return t.to(device=device, dtype=torch.float32).contiguous()
        a = self.x if rows is None else self.x[rows]
        # Share memory when the input already is writable C-contiguous float32 (torch cannot wrap read-only
        # arrays such as memmaps opened with mode 'r'); copy otherwise.
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not a.flags.writeable:
            a = a.copy()
        return torch.from_numpy(a).to(device)

    def to_numpy_f32(self, start: int, stop: int) -> np.ndarray:
        src = self.x[start:stop]
        if isinstance(src, torch.Tensor):
            return src.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        return np.ascontiguousarray(src, dtype=np.float32)


def block_rows(chunk_bytes: int, k: int, d: int, n_order: int) -> int:
    """Rows per score block: scores (4k bytes per row) plus the row's float32 copy and its float64/int64
    temporaries in the fixed-point sums (about 36d bytes).

    Depends only on global quantities, so every process of a distributed run gets the same block boundaries.
    """
    rows = max(1, chunk_bytes // (4 * k + 36 * d))
    return max(1, min(rows, n_order))


def aligned_blocks(
    rows: Rows, pos0: int, block: int, device: torch.device
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Yield (start, take, row0, buf): buf (block, d) holds rows[start:start+take] at buf[row0:row0+take].

    Blocks are aligned to multiples of ``block`` in the global order (``pos0`` is the global position of local row
    0), and the buffer always has exactly ``block`` rows, padded with zeros, so a given global row is always
    computed at the same place in a same-shaped GEMM whatever the sharding.
    """
    buf = torch.zeros(block, rows.d, dtype=torch.float32, device=device)
    start = 0
    while start < rows.n:
        row0 = (pos0 + start) % block
        take = min(block - row0, rows.n - start)
        if take < block:
            buf[:row0].zero_()
            buf[row0 + take :].zero_()
        rows.copy_into(buf[row0 : row0 + take], start, start + take)
        yield start, take, row0, buf
        start += take


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Force full-precision float32 GEMMs (no TF32 on CUDA, no bf16/TF32 in oneDNN) for the block's duration.

    Training code commonly enables TF32 globally; with it, near-tied centroids would be chosen differently from
    run to run and device to device. The settings are restored afterwards (global state: not thread-safe).
    """
    saved: list[tuple[Any, str]] = []
    for ns in (getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.mkldnn, "matmul", None)):
        if ns is not None and hasattr(ns, "fp32_precision"):
            saved.append((ns, ns.fp32_precision))
            ns.fp32_precision = "ieee"
    try:
        yield
    finally:
        for ns, value in saved:
            ns.fp32_precision = value


def best_scores(
    buf: torch.Tensor, centroids: torch.Tensor, neg_sqnorm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best score and index per row: max inner product (spherical) or max 2x.c - |c|^2 (nearest in L2)."""
    if neg_sqnorm is None:
        scores = buf @ centroids.T
    else:
        scores = torch.addmm(neg_sqnorm, buf, centroids.T, alpha=2.0)
    # torch.max returns the first maximal index on ties, so ties resolve to the lowest centroid id everywhere.
    best, labels = scores.max(dim=1)
    return best, labels


@dataclass(frozen=True)
class RowStats:
    """Global magnitudes of the rows: max |x_ij| and max |x_i|^2 (they fix the fixed-point scales)."""

    max_abs: float
    max_sq: float


def scan_rows(rows: Rows, device: torch.device, comm: LocalComm, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> RowStats:
    """Check every row for NaN/inf and measure the rows' magnitudes, in one pass over all processes' rows.

    The one input check of every backend, so FAISS and torch refuse bad features with the same message instead of
    FAISS failing deep inside C++. The verdict is reduced across processes, so in a distributed fit every rank
    raises together instead of leaving the others blocked in a collective. Raises ValueError on NaN or inf.
    """
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # [non-finite seen, max |x_ij|, max |x_i|^2]
    stats_block = block_rows(chunk_bytes, 1, rows.d, max(rows.n, 1))
    for _, take, row0, buf in aligned_blocks(rows, 0, stats_block, device):
        real = buf[row0 : row0 + take]
        if not bool(torch.isfinite(real).all()):
            stats[0] = 1.0
            break
        stats[1] = torch.maximum(stats[1], real.abs().max().double())
        stats[2] = torch.maximum(stats[2], (real.double() ** 2).sum(dim=1).max())
    stats = comm.all_reduce_(stats, "max")
    if stats[0] > 0:
        raise ValueError("x contains NaN or infinite values")
    return RowStats(max_abs=float(stats[1]), max_sq=float(stats[2]))
