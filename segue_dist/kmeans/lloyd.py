"""Lloyd's algorithm in torch on the global row order, identical in one process and under any sharding.

See the package docstring for the exactness argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from segue_dist.kmeans.config import KMeansConfig, KMeansResult
from segue_dist.kmeans.exact import LocalComm, fixed_point_scale, quantise
from segue_dist.kmeans.init import initial_centroids, renormalise, train_rows
from segue_dist.kmeans.rows import Rows, aligned_blocks, best_scores, block_rows, ieee_fp32_matmul, scan_rows

# Relative size of the symmetric perturbation that splits a large cluster to refill an empty one (FAISS uses the
# same 1/1024); any non-zero size works since the split is a hyperplane through the old centroid.
_SPLIT_EPS = 1.0 / 1024.0


def _split_direction(d: int, cfg: KMeansConfig, redo: int, it: int, ci: int, device: torch.device) -> torch.Tensor:
    r = np.random.default_rng([cfg.seed, 2, redo, it, ci]).standard_normal(d)
    r /= max(float(np.linalg.norm(r)), 1e-300)
    return torch.from_numpy(r).to(device)


def refill_empty(
    cent: torch.Tensor,
    counts: torch.Tensor,
    sse: torch.Tensor,
    cfg: KMeansConfig,
    redo: int,
    it: int,
    data_scale: float,
) -> int:
    """Refill empty clusters in place by splitting the clusters with the largest squared error.

    The chosen cluster's centroid c (the mean of its points, or its direction when spherical) becomes c - e*r and
    the empty one c + e*r, with r a seeded random unit direction orthogonal to c. The next assignment then cuts
    the cluster by the hyperplane through its mean orthogonal to r, which always leaves points on both sides of a
    cluster whose points are not all equal (a mean lies strictly inside its points' hull). Choosing by squared
    error rather than size (FAISS picks by size) matters: a large cluster of identical points cannot be split, and
    an empty cluster would stay empty. Only global tensors are used, so every process makes the same choice.
    Returns the number of splits.
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return 0
    # Clusters of one point have zero error; if no cluster can be split (fewer distinct points than k) fall back
    # to the most populated one, which is harmless.
    score = torch.where(counts > 1, sse, torch.zeros_like(sse))
    if not bool((score > 0).any()):
        score = counts.double()
    score = score.clone()
    for ci in empty:
        cj = int(torch.argmax(score))  # first maximum: lowest index among ties
        c = cent[cj].clone()
        r = _split_direction(cent.shape[1], cfg, redo, it, ci, cent.device)
        cn2 = float((c * c).sum())
        if cn2 > 0:  # orthogonal to c: equal norms, so spherical renormalisation keeps the boundary through c
            r = r - (float((r * c).sum()) / cn2) * c
            r = r / torch.linalg.vector_norm(r).clamp_min(1e-300)
        eps = _SPLIT_EPS * max(math.sqrt(cn2), data_scale)
        cent[ci] = c + eps * r
        cent[cj] = c - eps * r
        score[cj] = score[cj] / 2
        score[ci] = score[cj]
    return len(empty)


@dataclass
class _Pass:
    """Global outcome of one assignment pass over some rows."""

    sums: torch.Tensor  # (k, d) float64, exact sum of assigned points
    counts: torch.Tensor  # (k,) int64
    sqnorms: torch.Tensor  # (k,) float64, exact sum of |x|^2 of assigned points
    sqnorm: float  # exact sum of |x|^2 over all the rows

    def cluster_sse(self) -> torch.Tensor:
        """Squared error of each cluster around its own mean: sum |x|^2 - |sum x|^2 / n."""
        n = self.counts.clamp_min(1).double()
        return (self.sqnorms - (self.sums * self.sums).sum(dim=1) / n).clamp_min(0.0)


def _assign_pass(
    rows: Rows,
    pos0: int,
    block: int,
    cent: torch.Tensor,
    spherical: bool,
    device: torch.device,
    comm: LocalComm,
    vec_scale: float,
    sq_scale: float,
    labels_out: torch.Tensor | None = None,
) -> _Pass:
    k, d = cent.shape
    sums = torch.zeros(k, d, dtype=torch.int64, device=device)
    counts = torch.zeros(k, dtype=torch.int64, device=device)
    sq = torch.zeros(k, dtype=torch.int64, device=device)
    neg_sqnorm = None if spherical else -(cent * cent).sum(dim=1)
    with ieee_fp32_matmul():
        for start, take, row0, buf in aligned_blocks(rows, pos0, block, device):
            _, lab = best_scores(buf, cent, neg_sqnorm)
            lab = lab[row0 : row0 + take]
            real = buf[row0 : row0 + take]
            sums.index_add_(0, lab, quantise(real, vec_scale))
            counts += torch.bincount(lab, minlength=k)
            # Row norms on the whole same-shaped buffer, for the same reason the GEMM runs on it.
            sq.index_add_(0, lab, quantise((buf.double() ** 2).sum(dim=1)[row0 : row0 + take], sq_scale))
            if labels_out is not None:
                labels_out[start : start + take].copy_(lab)
    packed = comm.all_reduce_(torch.cat([sums.flatten(), counts, sq]), "sum")
    sq_g = packed[k * d + k :]
    return _Pass(
        sums=packed[: k * d].reshape(k, d).double() / vec_scale,
        counts=packed[k * d : k * d + k],
        sqnorms=sq_g.double() / sq_scale,
        sqnorm=float(sq_g.sum().double() / sq_scale),  # integer sum first: exact
    )


def _sse_from_pass(p: _Pass, cent64: torch.Tensor) -> tuple[float, float]:
    """(sum of inner products, sum of squared distances) of the pass's points to their centroids."""
    ip = float((cent64 * p.sums).sum())
    sse = p.sqnorm - 2.0 * ip + float((p.counts.double() * (cent64 * cent64).sum(dim=1)).sum())
    return ip, max(sse, 0.0)


def lloyd(
    rows: Rows, offset: int, n_total: int, cfg: KMeansConfig, device: torch.device, comm: LocalComm
) -> KMeansResult:
    """Lloyd's algorithm on the global row order; see the module docstring for the exactness argument."""
    k, d = cfg.k, rows.d

    # NaN/inf guard and the magnitudes that fix the fixed-point scales, over every process's rows.
    stats = scan_rows(rows, device, comm, cfg.chunk_bytes)
    max_abs, max_sq = stats.max_abs, stats.max_sq

    train_idx = train_rows(n_total, cfg)
    if train_idx is None:
        n_train, t_off = n_total, offset
        x_train = rows.gather(None, device)
    else:
        n_train = len(train_idx)
        lo, hi = np.searchsorted(train_idx, [offset, offset + rows.n])
        t_off = int(lo)
        x_train = rows.gather(train_idx[lo:hi] - offset, device)
    train = Rows(x_train, allow_empty=True)

    vec_scale_train = fixed_point_scale(n_train * max_abs)
    sq_scale_train = fixed_point_scale(n_train * max_sq)
    block_train = block_rows(cfg.chunk_bytes, k, d, n_train)
    # Relative split size falls back to the data's scale for (near-)zero centroids in L2 mode.
    data_scale = max(max_abs, 1e-30)

    best: tuple[float, torch.Tensor, list[float], int] | None = None
    for redo in range(cfg.nredo):
        cent = initial_centroids(x_train, t_off, n_train, cfg, redo, comm, max_sq)

        history: list[float] = []
        iterations = 0
        for it in range(cfg.niter):
            p = _assign_pass(
                train, t_off, block_train, cent, cfg.spherical, device, comm, vec_scale_train, sq_scale_train
            )
            ip, sse = _sse_from_pass(p, cent.double())
            history.append(ip if cfg.spherical else sse)
            iterations = it + 1
            new = p.sums / p.counts.clamp_min(1).double().unsqueeze(1)
            refill_empty(new, p.counts, p.cluster_sse(), cfg, redo, it, data_scale)
            if cfg.spherical:
                new = renormalise(new)
            new32 = new.float()
            converged = torch.equal(new32, cent)
            cent = new32
            if converged:  # labels can no longer change: the same on every process, no extra collective
                break
        obj = history[-1]
        if best is None or (obj > best[0] if cfg.spherical else obj < best[0]):
            best = (obj, cent, history, iterations)
    assert best is not None
    objective, cent, history, iterations = best
    del x_train, train

    # Label every point (the training sample may be a small part of the data) with the final centroids.
    labels = torch.empty(rows.n, dtype=torch.int64, device=device)
    block_all = block_rows(cfg.chunk_bytes, k, d, n_total)
    p = _assign_pass(
        rows,
        offset,
        block_all,
        cent,
        cfg.spherical,
        device,
        comm,
        fixed_point_scale(n_total * max_abs),
        fixed_point_scale(n_total * max_sq),
        labels_out=labels,
    )
    _, inertia = _sse_from_pass(p, cent.double())
    return KMeansResult(
        centroids=cent.cpu().numpy(),
        labels=labels.cpu().numpy(),
        sizes=p.counts.cpu().numpy(),
        inertia=inertia,
        objective=objective,
        objective_history=tuple(history),
        iterations=iterations,
        backend="torch",
        device=str(device),
        n_train=n_train,
        n_points=n_total,
        world_size=comm.world_size,
        offset=offset,
    )
