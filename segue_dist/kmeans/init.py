"""Initial centroids: the training subsample, random or greedy k-means++ seeding, all on the global row order."""

from __future__ import annotations

import math

import numpy as np
import torch

from segue_dist.kmeans.config import KMeansConfig
from segue_dist.kmeans.exact import LocalComm, fixed_point_scale, quantise
from segue_dist.kmeans.rows import ieee_fp32_matmul


def train_rows(n_total: int, cfg: KMeansConfig) -> np.ndarray | None:
    """Sorted global indices of the training subsample, or None when every point trains."""
    cap = cfg.max_train_points
    if n_total <= cap:
        return None
    rng = np.random.default_rng([cfg.seed, 0])
    rows = rng.choice(n_total, size=cap, replace=False, shuffle=False)
    rows.sort()
    return rows.astype(np.int64)


def init_positions(n_train: int, cfg: KMeansConfig, redo: int) -> np.ndarray:
    """Positions (in the global training order) of the seeding candidates of run ``redo``.

    Random init: the k initial centroids themselves. k-means++: the subset it samples from.
    """
    size = cfg.k if cfg.init == "random" else min(n_train, cfg.k * cfg.init_points_per_centroid)
    return np.random.default_rng([cfg.seed, 1, redo]).choice(n_train, size=size, replace=False)


def _gather_positions(x_train: torch.Tensor, t_off: int, positions: np.ndarray, comm: LocalComm) -> torch.Tensor:
    """float32 (len(positions), d): the training rows at these global positions, identical on every process.

    Each process writes the rows it owns into a zero buffer and the buffers are sum-reduced: one non-zero term per
    element, so the result is exact. Adding +0.0 turns -0.0 into +0.0, which the reduction would also do, so the
    single-process path produces the same bits.
    """
    buf = torch.zeros(len(positions), x_train.shape[1], dtype=torch.float32, device=x_train.device)
    mine = np.nonzero((positions >= t_off) & (positions < t_off + x_train.shape[0]))[0]
    if len(mine):
        dst = torch.as_tensor(mine, device=x_train.device)
        buf[dst] = x_train[torch.as_tensor(positions[mine] - t_off, device=x_train.device)]
    return comm.all_reduce_(buf, "sum") + 0.0


class _KMeansPPState:
    """Device-resident state of greedy k-means++ so one step is a fixed sequence of kernels with no host sync."""

    def __init__(self, points: torch.Tensor, k: int, uniforms: torch.Tensor, first: int, scale: float) -> None:
        device = points.device
        self.points = points
        self.uniforms = uniforms  # (k, trials) float64
        # Fixed-point squared norms; distances are then integer sums, so weights, cumulative sums and potentials
        # are exact whatever the scan order or parallelism of the device.
        self.pn_q = quantise((points.double() ** 2).sum(dim=1), scale)
        self.two_scale = 2.0 * scale
        self.chosen = torch.zeros(k, dtype=torch.int64, device=device)
        self.chosen[0] = first
        self.j = torch.ones(1, dtype=torch.int64, device=device)  # next seed to choose
        first_t = torch.tensor([first], dtype=torch.int64, device=device)
        self.d2 = self._dist_q(first_t)[:, 0].contiguous()

    def _dist_q(self, idx: torch.Tensor) -> torch.Tensor:
        """Fixed-point |p - c|^2 for all points p and the points idx (s, len(idx)), clamped at 0."""
        ip = self.points @ self.points[idx].T  # float32; x2^s scaling is exact in float64
        dq = self.pn_q[:, None] + self.pn_q[idx][None, :] - torch.round(ip.double() * self.two_scale).long()
        return dq.clamp_min_(0)

    def step(self) -> None:
        cum = torch.cumsum(self.d2, dim=0)
        total = cum[-1:]
        u = self.uniforms.index_select(0, self.j)[0]
        # target in [0, total); when every weight is 0 (fewer distinct points than k) target is -1 -> index 0.
        target = torch.minimum((u * total.double()).long(), total - 1)
        idx = torch.searchsorted(cum, target, right=True)
        newd = torch.minimum(self._dist_q(idx), self.d2[:, None])
        best = torch.argmin(newd.sum(dim=0)).reshape(1)  # first minimum on ties
        self.chosen.index_copy_(0, self.j, idx.index_select(0, best))
        self.d2.copy_(newd.index_select(1, best)[:, 0])
        self.j.add_(1)


def kmeanspp(
    points: torch.Tensor, k: int, rng: np.random.Generator, max_sq: float, graph: bool | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeds from ``points`` (s, d) float32; deterministic given the rng.

    Each step draws 2 + ln(k) candidates by D^2 sampling and keeps the one that lowers the potential most
    (Arthur & Vassilvitskii's greedy variant, as in scikit-learn): plain D^2 sampling in high dimension often
    skips clusters, because the many points near existing seeds carry as much D^2 mass as the few far away.
    Scoring all candidates is one GEMM over the points, about the memory traffic of scoring one.

    The k steps are sequential and each is small, so kernel launches dominate on a GPU; on CUDA (``graph=None``)
    one step is captured as a CUDA graph and replayed, the same kernels on the same data, so the result is bitwise
    the eager one (tested). Timings: docs/measurements.md.
    """
    s, _ = points.shape
    trials = 2 + int(math.log(k)) if k > 1 else 1
    first = int(rng.integers(s))
    uniforms = torch.from_numpy(rng.random((k, trials))).to(points.device)
    # Squared distances between points are at most (2 max|x|)^2; s of them must fit the fixed-point range.
    state = _KMeansPPState(points, k, uniforms, first, fixed_point_scale(s * 4.0 * max_sq))
    if graph is None:
        graph = points.is_cuda and k > 3
    with ieee_fp32_matmul():
        if not graph or k <= 3:
            for _ in range(1, k):
                state.step()
        else:
            # Warm up on a side stream (lazy cuBLAS/CUB initialisation must not happen during capture); the
            # warm-up step is a real step (j = 1). Capture records step j without running it; replay the rest.
            side = torch.cuda.Stream(device=points.device)
            side.wait_stream(torch.cuda.current_stream(points.device))
            with torch.cuda.stream(side):
                state.step()
            torch.cuda.current_stream(points.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                state.step()
            for _ in range(2, k):
                g.replay()
            torch.cuda.synchronize(points.device)
            del g
    return points[state.chosen]


def initial_centroids(
    x_train: torch.Tensor, t_off: int, n_train: int, cfg: KMeansConfig, redo: int, comm: LocalComm, max_sq: float
) -> torch.Tensor:
    """float32 (k, d) initial centroids of run ``redo``, a function of the global training order only."""
    cand = _gather_positions(x_train, t_off, init_positions(n_train, cfg, redo), comm)
    if cfg.init == "kmeans++":
        cand = kmeanspp(cand, cfg.k, np.random.default_rng([cfg.seed, 4, redo]), max_sq)
    if cfg.spherical:
        cand = renormalise(cand.double()).float()
    return cand


def renormalise(cent: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(cent, dim=1, keepdim=True)
    # FAISS leaves zero-norm centroids alone rather than dividing by zero.
    return torch.where(norms > 0, cent / norms.clamp_min(torch.finfo(cent.dtype).tiny), cent)
