"""K-means for Segue's pseudo-labels: FAISS, pure torch (CPU or CUDA) and multi-process Lloyd.

Segue (unsupervised scenario) clusters L2-normalised face features into K groups and uses the cluster ids as
side information; it works as long as clustering accuracy exceeds 80%, so the clustering has to be good *and*
every image has to get a label.

Backends
--------
* ``faiss``: ``faiss.Kmeans`` (all visible GPUs with faiss-gpu, else CPU). FAISS trains on at most
  ``k * max_points_per_centroid`` points and ignores the rest, so every point is assigned afterwards with a
  batched flat-index search.
* ``torch``: Lloyd in pure torch, so CUDA machines without faiss-gpu (it is not installable everywhere) still
  cluster on the GPU. It is also the algorithm :func:`fit_kmeans_distributed` runs, and the two give
  **bitwise-identical** results for the same data, seed and device type, however the data is sharded.

How the torch algorithm stays identical under any sharding
----------------------------------------------------------
Everything that could depend on which process holds which rows is defined on the *global* row order instead:

1. Training subsample and initial centroids are drawn (numpy PCG64, from ``seed``) as global row indices; each
   process contributes the rows it owns to a zero buffer that is sum-reduced (one non-zero term per element, so
   the sum is exact).
2. Score blocks ``x @ C.T`` are computed on buffers of a fixed number of rows whose boundaries are multiples of
   that number in the global order; a process's rows sit in the same buffer rows as they would in a single
   process, zero rows elsewhere. GEMM results therefore cannot differ through shape- or position-dependent kernel
   choices (cuBLAS and MKL both pick kernels by shape).
3. Per-centroid sums are accumulated in 64-bit *fixed point* (each float32 value scaled by a power of two chosen
   from the global max magnitude and rounded to int64). Integer addition is associative, so the reduced sums are
   exact whatever the order of atomics, threads or ranks; the quantisation step is below float32 resolution of
   the centroids (2**-42 for a million unit-norm features).
4. Centroid updates, empty-cluster splits, objectives and the best-of-``nredo`` choice are computed from the
   reduced tensors only, identically on every process, so no process ever decides anything alone.

Assignment is done in float32 with TF32/bf16 matmul disabled for the duration: reduced precision changes which
centroid wins near-ties, and such labels would not be reproducible across devices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ArrayLike",
    "Backend",
    "GpuPolicy",
    "Init",
    "KEstimate",
    "KMeansConfig",
    "KMeansResult",
    "assign",
    "estimate_k",
    "fit_kmeans",
    "fit_kmeans_distributed",
    "overcluster_k",
]

Backend = Literal["auto", "faiss", "torch"]
GpuPolicy = Literal["auto", "never", "always"]
Init = Literal["kmeans++", "random"]
ArrayLike = np.ndarray | torch.Tensor

# Relative size of the symmetric perturbation that splits a large cluster to refill an empty one (FAISS uses the
# same 1/1024); any non-zero size works since the split is a hyperplane through the old centroid.
_SPLIT_EPS = 1.0 / 1024.0
# Fixed-point sums are kept below 2**62 so that the rounding slack (n/2) cannot overflow int64.
_FIXED_POINT_HEADROOM_BITS = 62
# faiss' ClusteringParameters.seed is a C int.
_MAX_SEED = 2**31 - 1
_DEFAULT_CHUNK_BYTES = 256 * 2**20
# Rows per FAISS search call: bounds the float32 copy of the queries and the (n, 1) outputs.
_FAISS_SEARCH_ROWS = 65536


@dataclass
class KMeansConfig:
    """K-means settings shared by all backends.

    ``spherical`` is for L2-normalised features: centroids are re-normalised after every update and points go to
    the centroid with the largest inner product (inputs are *not* normalised here; normalise features first).
    ``max_points_per_centroid`` caps the training sample at ``k * max_points_per_centroid`` points, as in FAISS;
    all points are labelled regardless.

    ``init='kmeans++'`` (default) seeds with D^2 sampling on a random subset of ``k * init_points_per_centroid``
    training points: plain random seeding (FAISS' default, ``init='random'``) often puts two centroids in one
    identity and merges two others, a local minimum Lloyd never leaves, and Segue needs > 80% accuracy. The subset
    bounds the sequential k-means++ cost at O(k^2 * init_points_per_centroid * d) instead of O(k * n * d); with
    imbalanced cluster sizes 32 points per centroid matched scikit-learn's full-data k-means++ in accuracy, 8 lost
    about 3 points (small clusters got no candidate). ``chunk_bytes`` bounds the working memory of one block of the
    (points x centroids) score matrix. It is part of the algorithm's definition for the torch backend (block
    boundaries), so every process of a distributed run must use the same value.
    """

    k: int
    niter: int = 20
    seed: int = 0
    spherical: bool = True
    nredo: int = 1
    max_points_per_centroid: int = 256
    init: Init = "kmeans++"
    init_points_per_centroid: int = 32
    backend: Backend = "auto"
    gpu: GpuPolicy = "auto"
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        int_fields = (
            "k",
            "niter",
            "seed",
            "nredo",
            "max_points_per_centroid",
            "init_points_per_centroid",
            "chunk_bytes",
        )
        for name in int_fields:
            value = getattr(self, name)
            # bool is an int subclass; k=True is a bug, not 1.
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"KMeansConfig.{name} must be an int, got {value!r}")
            setattr(self, name, int(value))
        if self.k < 1:
            raise ValueError(f"KMeansConfig.k must be >= 1, got {self.k}")
        if self.niter < 1:
            raise ValueError(f"KMeansConfig.niter must be >= 1, got {self.niter}")
        if not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"KMeansConfig.seed must be in [0, {_MAX_SEED}] (FAISS takes a C int), got {self.seed}")
        if self.nredo < 1:
            raise ValueError(f"KMeansConfig.nredo must be >= 1, got {self.nredo}")
        if self.max_points_per_centroid < 1:
            raise ValueError(f"KMeansConfig.max_points_per_centroid must be >= 1, got {self.max_points_per_centroid}")
        if self.init_points_per_centroid < 1:
            raise ValueError(f"KMeansConfig.init_points_per_centroid must be >= 1, got {self.init_points_per_centroid}")
        if self.init not in ("kmeans++", "random"):
            raise ValueError(f"KMeansConfig.init must be 'kmeans++' or 'random', got {self.init!r}")
        if self.chunk_bytes < 1:
            raise ValueError(f"KMeansConfig.chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if not isinstance(self.spherical, bool):
            raise ValueError(f"KMeansConfig.spherical must be a bool, got {self.spherical!r}")
        if self.backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"KMeansConfig.backend must be 'auto', 'faiss' or 'torch', got {self.backend!r}")
        if self.gpu not in ("auto", "never", "always"):
            raise ValueError(f"KMeansConfig.gpu must be 'auto', 'never' or 'always', got {self.gpu!r}")

    @property
    def max_train_points(self) -> int:
        return self.k * self.max_points_per_centroid


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of a K-means fit.

    ``labels`` covers every input point (in a distributed fit: every *local* point, global row ``offset + i``);
    ``centroids``, ``sizes``, ``inertia`` and ``objective`` are global. ``inertia`` is the sum of squared L2
    distances of all points to their assigned centroid; ``objective`` is what the algorithm optimised on the
    training sample at its last iteration (sum of inner products when spherical, else sum of squared distances),
    ``objective_history`` one value per iteration of the kept run.
    """

    centroids: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    inertia: float
    objective: float
    objective_history: tuple[float, ...]
    iterations: int
    backend: str
    device: str
    n_train: int
    n_points: int
    world_size: int = 1
    offset: int = 0


@dataclass(frozen=True)
class KEstimate:
    """Result of :func:`estimate_k`: the chosen K and the score of every candidate (higher is better)."""

    k: int
    scores: dict[int, float] = field(default_factory=dict)
    method: str = "silhouette"
    sample_size: int = 0


# --------------------------------------------------------------------------------------------------------------
# Input handling: host arrays (numpy, memmaps, any float dtype) are streamed block by block and converted to
# float32 on the way, so a large feature file is never copied whole.


class _Rows:
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


def _block_rows(chunk_bytes: int, k: int, d: int, n_order: int) -> int:
    """Rows per score block: scores (4k bytes per row) plus the row's float32 copy and its float64/int64
    temporaries in the fixed-point sums (about 36d bytes).

    Depends only on global quantities, so every process of a distributed run gets the same block boundaries.
    """
    rows = max(1, chunk_bytes // (4 * k + 36 * d))
    return max(1, min(rows, n_order))


def _aligned_blocks(
    rows: _Rows, pos0: int, block: int, device: torch.device
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
def _ieee_fp32_matmul() -> Iterator[None]:
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


def _best(
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


# --------------------------------------------------------------------------------------------------------------
# Collectives: the single-process path runs the same code with no-op collectives.


class _LocalComm:
    world_size = 1
    rank = 0

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        return [list(values)]


class _DistComm(_LocalComm):
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


def _fixed_point_scale(bound: float) -> float:
    """Power of two s such that n values of magnitude <= bound/n, scaled by s and rounded, sum below 2**62."""
    if not math.isfinite(bound) or bound <= 0.0:
        return 1.0
    exponent = math.floor(_FIXED_POINT_HEADROOM_BITS - math.log2(bound))
    return math.ldexp(1.0, max(-1000, min(1000, exponent)))


def _quantise(t: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.round(t.double() * scale).long()


def _train_rows(n_total: int, cfg: KMeansConfig) -> np.ndarray | None:
    """Sorted global indices of the training subsample, or None when every point trains."""
    cap = cfg.max_train_points
    if n_total <= cap:
        return None
    rng = np.random.default_rng([cfg.seed, 0])
    rows = rng.choice(n_total, size=cap, replace=False, shuffle=False)
    rows.sort()
    return rows.astype(np.int64)


def _init_positions(n_train: int, cfg: KMeansConfig, redo: int) -> np.ndarray:
    """Positions (in the global training order) of the seeding candidates of run ``redo``.

    Random init: the k initial centroids themselves. k-means++: the subset it samples from.
    """
    size = cfg.k if cfg.init == "random" else min(n_train, cfg.k * cfg.init_points_per_centroid)
    return np.random.default_rng([cfg.seed, 1, redo]).choice(n_train, size=size, replace=False)


def _gather_positions(x_train: torch.Tensor, t_off: int, positions: np.ndarray, comm: _LocalComm) -> torch.Tensor:
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
        self.pn_q = _quantise((points.double() ** 2).sum(dim=1), scale)
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


def _kmeanspp(
    points: torch.Tensor, k: int, rng: np.random.Generator, max_sq: float, graph: bool | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeds from ``points`` (s, d) float32; deterministic given the rng.

    Each step draws 2 + ln(k) candidates by D^2 sampling and keeps the one that lowers the potential most
    (Arthur & Vassilvitskii's greedy variant, as in scikit-learn): plain D^2 sampling in high dimension often
    skips clusters, because the many points near existing seeds carry as much D^2 mass as the few far away.
    Scoring all candidates is one GEMM over the points, about the memory traffic of scoring one.

    The k steps are sequential and each is small. Eagerly, the ~20 kernel launches per step dominate on a GPU
    (k=10k, 320k candidates, d=512: ~7 s on an H200); on CUDA (``graph=None``) one step is captured as a CUDA graph
    and replayed, the same kernels on the same data, so the result is bitwise the eager one (tested), and the cost
    becomes the skinny GEMM's memory traffic (~5 s there at 32 candidates per seed, ~1.8 s at 8).
    """
    s, _ = points.shape
    trials = 2 + int(math.log(k)) if k > 1 else 1
    first = int(rng.integers(s))
    uniforms = torch.from_numpy(rng.random((k, trials))).to(points.device)
    # Squared distances between points are at most (2 max|x|)^2; s of them must fit the fixed-point range.
    state = _KMeansPPState(points, k, uniforms, first, _fixed_point_scale(s * 4.0 * max_sq))
    if graph is None:
        graph = points.is_cuda and k > 3
    with _ieee_fp32_matmul():
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


def _initial_centroids(
    x_train: torch.Tensor, t_off: int, n_train: int, cfg: KMeansConfig, redo: int, comm: _LocalComm, max_sq: float
) -> torch.Tensor:
    """float32 (k, d) initial centroids of run ``redo``, a function of the global training order only."""
    cand = _gather_positions(x_train, t_off, _init_positions(n_train, cfg, redo), comm)
    if cfg.init == "kmeans++":
        cand = _kmeanspp(cand, cfg.k, np.random.default_rng([cfg.seed, 4, redo]), max_sq)
    if cfg.spherical:
        cand = _renormalise(cand.double()).float()
    return cand


def _split_direction(d: int, cfg: KMeansConfig, redo: int, it: int, ci: int, device: torch.device) -> torch.Tensor:
    r = np.random.default_rng([cfg.seed, 2, redo, it, ci]).standard_normal(d)
    r /= max(float(np.linalg.norm(r)), 1e-300)
    return torch.from_numpy(r).to(device)


def _refill_empty(
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


def _renormalise(cent: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(cent, dim=1, keepdim=True)
    # FAISS leaves zero-norm centroids alone rather than dividing by zero.
    return torch.where(norms > 0, cent / norms.clamp_min(torch.finfo(cent.dtype).tiny), cent)


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
    rows: _Rows,
    pos0: int,
    block: int,
    cent: torch.Tensor,
    spherical: bool,
    device: torch.device,
    comm: _LocalComm,
    vec_scale: float,
    sq_scale: float,
    labels_out: torch.Tensor | None = None,
) -> _Pass:
    k, d = cent.shape
    sums = torch.zeros(k, d, dtype=torch.int64, device=device)
    counts = torch.zeros(k, dtype=torch.int64, device=device)
    sq = torch.zeros(k, dtype=torch.int64, device=device)
    neg_sqnorm = None if spherical else -(cent * cent).sum(dim=1)
    with _ieee_fp32_matmul():
        for start, take, row0, buf in _aligned_blocks(rows, pos0, block, device):
            _, lab = _best(buf, cent, neg_sqnorm)
            lab = lab[row0 : row0 + take]
            real = buf[row0 : row0 + take]
            sums.index_add_(0, lab, _quantise(real, vec_scale))
            counts += torch.bincount(lab, minlength=k)
            # Row norms on the whole same-shaped buffer, for the same reason the GEMM runs on it.
            sq.index_add_(0, lab, _quantise((buf.double() ** 2).sum(dim=1)[row0 : row0 + take], sq_scale))
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


def _lloyd(
    rows: _Rows, offset: int, n_total: int, cfg: KMeansConfig, device: torch.device, comm: _LocalComm
) -> KMeansResult:
    """Lloyd's algorithm on the global row order; see the module docstring for the exactness argument."""
    k, d = cfg.k, rows.d

    # One pass for global statistics: non-finite guard (checked on every rank, so all raise together instead of
    # leaving the others blocked in a collective) and the magnitudes that fix the fixed-point scales.
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # [non-finite seen, max |x_ij|, max |x_i|^2]
    stats_block = _block_rows(cfg.chunk_bytes, 1, d, max(rows.n, 1))
    for _, take, row0, buf in _aligned_blocks(rows, 0, stats_block, device):
        real = buf[row0 : row0 + take]
        if not bool(torch.isfinite(real).all()):
            stats[0] = 1.0
            break
        stats[1] = torch.maximum(stats[1], real.abs().max().double())
        stats[2] = torch.maximum(stats[2], (real.double() ** 2).sum(dim=1).max())
    stats = comm.all_reduce_(stats, "max")
    if stats[0] > 0:
        raise ValueError("x contains NaN or infinite values")
    max_abs, max_sq = float(stats[1]), float(stats[2])

    train_idx = _train_rows(n_total, cfg)
    if train_idx is None:
        n_train, t_off = n_total, offset
        x_train = rows.gather(None, device)
    else:
        n_train = len(train_idx)
        lo, hi = np.searchsorted(train_idx, [offset, offset + rows.n])
        t_off = int(lo)
        x_train = rows.gather(train_idx[lo:hi] - offset, device)
    train = _Rows(x_train, allow_empty=True)

    vec_scale_train = _fixed_point_scale(n_train * max_abs)
    sq_scale_train = _fixed_point_scale(n_train * max_sq)
    block_train = _block_rows(cfg.chunk_bytes, k, d, n_train)
    # Relative split size falls back to the data's scale for (near-)zero centroids in L2 mode.
    data_scale = max(max_abs, 1e-30)

    best: tuple[float, torch.Tensor, list[float], int] | None = None
    for redo in range(cfg.nredo):
        cent = _initial_centroids(x_train, t_off, n_train, cfg, redo, comm, max_sq)

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
            _refill_empty(new, p.counts, p.cluster_sse(), cfg, redo, it, data_scale)
            if cfg.spherical:
                new = _renormalise(new)
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
    block_all = _block_rows(cfg.chunk_bytes, k, d, n_total)
    p = _assign_pass(
        rows,
        offset,
        block_all,
        cent,
        cfg.spherical,
        device,
        comm,
        _fixed_point_scale(n_total * max_abs),
        _fixed_point_scale(n_total * max_sq),
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


# --------------------------------------------------------------------------------------------------------------
# FAISS backend.


def _faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_num_gpus(faiss: Any) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _fit_faiss(rows: _Rows, cfg: KMeansConfig, ngpu: int) -> KMeansResult:
    faiss = _faiss()
    assert faiss is not None
    n, d = rows.n, rows.d
    # Subsample ourselves (same global-index rule as the torch backend) so FAISS never subsamples silently and
    # n_train is known; FAISS then sees at most k * max_points_per_centroid points.
    train_idx = _train_rows(n, cfg)
    if isinstance(rows.x, torch.Tensor):
        sel = rows.x if train_idx is None else rows.x[torch.as_tensor(train_idx, device=rows.x.device)]
        xt = sel.to(device="cpu", dtype=torch.float32).contiguous().numpy()
    else:
        xt = np.ascontiguousarray(rows.x if train_idx is None else rows.x[train_idx], dtype=np.float32)
    if not xt.flags.writeable:  # e.g. a read-only memmap; torch.from_numpy cannot wrap it
        xt = xt.copy()
    n_train = len(xt)
    xt_t = torch.from_numpy(xt)
    max_sq = float((xt_t.double() ** 2).sum(dim=1).max())
    # One faiss.Kmeans per run, so each run can start from our k-means++ seeds (faiss' own nredo would reuse one
    # set of init_centroids for every run) and so the kept run's history is known.
    best: tuple[float, Any] | None = None
    for redo in range(cfg.nredo):
        init = None
        if cfg.init == "kmeans++":
            init = _initial_centroids(xt_t, 0, n_train, cfg, redo, _LocalComm(), max_sq).numpy()
        km = faiss.Kmeans(
            d,
            cfg.k,
            niter=cfg.niter,
            nredo=1,
            seed=(cfg.seed + redo) % (_MAX_SEED + 1),
            spherical=cfg.spherical,
            max_points_per_centroid=cfg.max_points_per_centroid,
            # Only drives a stderr warning for small inputs; library code does not print.
            min_points_per_centroid=1,
            verbose=False,
            gpu=ngpu if ngpu > 0 else False,
        )
        km.train(xt, init_centroids=init)
        obj = float(km.obj[-1])
        if best is None or (obj > best[0] if cfg.spherical else obj < best[0]):
            best = (obj, km)
    del xt, xt_t
    assert best is not None
    km = best[1]
    history = tuple(float(v) for v in km.obj)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    # After train() the index holds the centroids of the *previous* iteration; rebuild it with the final ones.
    index = km.index
    index.reset()
    index.add(centroids)
    labels = np.empty(n, dtype=np.int64)
    sse = 0.0
    cn = (centroids.astype(np.float64) ** 2).sum(axis=1)
    for start in range(0, n, _FAISS_SEARCH_ROWS):
        q = rows.to_numpy_f32(start, min(n, start + _FAISS_SEARCH_ROWS))
        dist_, idx = index.search(q, 1)
        lab = idx[:, 0].astype(np.int64)
        labels[start : start + len(q)] = lab
        if cfg.spherical:  # IP index: |x - c|^2 = |x|^2 + |c|^2 - 2 x.c
            sq = (q.astype(np.float64) ** 2).sum(axis=1) + cn[lab] - 2.0 * dist_[:, 0].astype(np.float64)
        else:
            sq = dist_[:, 0].astype(np.float64)
        sse += float(np.maximum(sq, 0.0).sum())
    return KMeansResult(
        centroids=centroids,
        labels=labels,
        sizes=np.bincount(labels, minlength=cfg.k).astype(np.int64),
        inertia=sse,
        objective=history[-1],
        objective_history=history,
        iterations=len(history),
        backend="faiss",
        device=f"gpu x{ngpu}" if ngpu > 0 else "cpu",
        n_train=n_train,
        n_points=n,
    )


# --------------------------------------------------------------------------------------------------------------
# Public API.


def _torch_device(policy: GpuPolicy, device: torch.device | str | None, rows: _Rows | None) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} requested but CUDA is not available")
        return dev
    if rows is not None and rows.is_cuda and policy != "never":
        assert isinstance(rows.x, torch.Tensor)
        return rows.x.device
    if policy != "never" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if policy == "always":
        raise RuntimeError("KMeansConfig.gpu='always' but no CUDA device is available to torch")
    return torch.device("cpu")


def fit_kmeans(x: ArrayLike, cfg: KMeansConfig, device: torch.device | str | None = None) -> KMeansResult:
    """Cluster the rows of ``x`` (N, D) into ``cfg.k`` groups and label every row.

    Backend choice with ``backend='auto'``: FAISS on GPUs when faiss-gpu sees any, else torch on CUDA when
    available, else FAISS on CPU, else torch on CPU (``gpu='never'`` skips the GPU options, ``'always'`` raises
    without one). ``device`` forces the torch backend onto that device. ``x`` may be any float dtype (converted
    to float32 block by block; a numpy memmap is never loaded whole). Raises ValueError when k > N or x holds
    NaN/inf.

    The torch backend gives bitwise the same result as :func:`fit_kmeans_distributed` on the same rows split
    over any number of processes (same seed, config and device type). When torch.distributed is initialised this
    function still clusters only the given rows, as a single process.
    """
    rows = _Rows(x)
    if cfg.k > rows.n:
        raise ValueError(f"k={cfg.k} clusters requested for only N={rows.n} points (k must be <= N)")
    faiss = _faiss() if cfg.backend in ("auto", "faiss") else None
    ngpu = _faiss_num_gpus(faiss) if faiss is not None and cfg.gpu != "never" else 0

    if cfg.backend == "faiss":
        if faiss is None:
            raise ImportError("KMeansConfig.backend='faiss' but faiss is not installed (pip install faiss-cpu)")
        if device is not None:
            raise ValueError("device applies to the torch backend; use KMeansConfig.gpu for FAISS")
        if cfg.gpu == "always" and ngpu == 0:
            raise RuntimeError("KMeansConfig.gpu='always' but faiss sees no GPU (install a faiss-gpu build)")
        return _fit_faiss(rows, cfg, ngpu)

    use_torch = (
        cfg.backend == "torch"
        or device is not None
        or faiss is None
        or (ngpu == 0 and cfg.gpu != "never" and (torch.cuda.is_available() or rows.is_cuda))
    )
    if not use_torch:
        if cfg.gpu == "always" and ngpu == 0:
            raise RuntimeError("KMeansConfig.gpu='always' but neither faiss nor torch sees a GPU")
        return _fit_faiss(rows, cfg, ngpu)
    dev = _torch_device(cfg.gpu, device, rows)
    return _lloyd(rows, 0, rows.n, cfg, dev, _LocalComm())


def fit_kmeans_distributed(
    local_x: ArrayLike,
    cfg: KMeansConfig,
    device: torch.device | str | None = None,
    group: Any = None,
) -> KMeansResult:
    """Lloyd's K-means over a dataset sharded across the processes of an initialised torch.distributed group.

    Each process passes its own rows; the global order is rank 0's rows, then rank 1's, and so on (shards may
    have different sizes, even zero). Every process must call this with the same ``cfg`` and feature dimension.
    Returns the labels of the *local* rows (global rows ``result.offset + i``) and the global centroids, sizes,
    inertia and objective, identical on every process and bitwise equal to ``fit_kmeans(concat(shards), cfg,
    backend='torch')`` on the same device type.

    Communication per iteration: one all-reduce of k x (d + 2) int64. Works with gloo (CPU tensors) and
    NCCL (CUDA tensors). Device: ``device`` if given; else the current CUDA device under NCCL; else CUDA when
    ``cfg.gpu='always'``; else CPU.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fit_kmeans_distributed needs an initialised torch.distributed process group")
    if cfg.backend == "faiss":
        raise ValueError(
            "fit_kmeans_distributed runs the torch algorithm (FAISS' flat search switches kernels with the batch "
            "size, so its labels would depend on the sharding); use backend='auto' or 'torch'"
        )
    comm = _DistComm(group)
    rows = _Rows(local_x, allow_empty=True)
    if device is None:
        if comm.device.type == "cuda":
            device = comm.device
        elif cfg.gpu == "always":
            device = _torch_device("always", None, None)
        else:
            device = torch.device("cpu")
    dev = _torch_device(cfg.gpu, device, rows)
    gathered = comm.all_gather_ints([rows.n, rows.d])
    counts = [g[0] for g in gathered]
    dims = {g[1] for g in gathered}
    if len(dims) != 1:
        raise ValueError(f"feature dimension differs between processes: {[g[1] for g in gathered]}")
    n_total = sum(counts)
    if cfg.k > n_total:
        raise ValueError(f"k={cfg.k} clusters requested for only N={n_total} points in total (k must be <= N)")
    offset = sum(counts[: comm.rank])
    return _lloyd(rows, offset, n_total, cfg, dev, comm)


def assign(
    x: ArrayLike,
    centroids: ArrayLike,
    spherical: bool = True,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x``: (labels int64 (N,), scores float32 (N,)).

    Scores are inner products when ``spherical`` (largest wins) and squared L2 distances otherwise. Works in
    blocks of ``chunk`` rows (default: a ~256 MB score block) in float32 without TF32, so memory stays flat and
    labels match those of the torch K-means backend. Ties go to the lowest centroid index. Runs on ``device``,
    else on x's CUDA device, else on CUDA when available, else on CPU.
    """
    rows = _Rows(x)
    c = _Rows(centroids)
    if c.d != rows.d:
        raise ValueError(f"centroids have dimension {c.d}, x has {rows.d}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dev = _torch_device("auto", device, rows)
    cent = c.gather(None, dev)
    k = c.n
    block = chunk if chunk is not None else _block_rows(_DEFAULT_CHUNK_BYTES, k, rows.d, rows.n)
    block = min(block, rows.n)
    labels = torch.empty(rows.n, dtype=torch.int64, device=dev)
    scores = torch.empty(rows.n, dtype=torch.float32, device=dev)
    neg_sqnorm = None if spherical else -(cent * cent).sum(dim=1)
    with _ieee_fp32_matmul():
        for start, take, row0, buf in _aligned_blocks(rows, 0, block, dev):
            best, lab = _best(buf, cent, neg_sqnorm)
            labels[start : start + take] = lab[row0 : row0 + take]
            best = best[row0 : row0 + take]
            if not spherical:  # |x - c|^2 = |x|^2 - (2x.c - |c|^2)
                best = ((buf[row0 : row0 + take] ** 2).sum(dim=1) - best).clamp_min(0.0)
            scores[start : start + take] = best
    return labels.cpu().numpy(), scores.cpu().numpy()


def overcluster_k(k: int, m: float) -> int:
    """Number of clusters for over-clustering: m * K (rounded), with m >= 1.

    Over-clustering trades the one-to-one clustering accuracy for purity: each identity is split into about m
    pure clusters instead of being merged with another one.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not math.isfinite(m) or m < 1:
        raise ValueError(f"over-clustering factor m must be >= 1, got {m!r}")
    return max(int(k), round(m * int(k)))


def estimate_k(
    x: ArrayLike,
    candidates: Sequence[int],
    cfg: KMeansConfig | None = None,
    sample_size: int = 5000,
    seed: int = 0,
) -> KEstimate:
    """Pick K among ``candidates`` by the mean silhouette coefficient on a random subsample.

    Why silhouette: it needs no reference distribution (unlike the gap statistic) and no visual judgement (unlike
    the elbow), is bounded in [-1, 1] and peaks when clusters are compact and well separated, which is what
    identity clusters of a good face embedding are. Each candidate is clustered on the same subsample with
    ``cfg`` (``k`` replaced; default spherical torch/FAISS K-means) and scored with cosine distance when
    spherical, Euclidean otherwise. Cost is O(sample_size^2) per candidate. The subsample must hold several
    points per cluster: with few images per identity, raise ``sample_size``. Candidates outside
    [2, sample_size - 1] cannot be scored and are rejected.
    """
    from sklearn.metrics import silhouette_score

    rows = _Rows(x)
    cands = sorted({int(c) for c in candidates})
    if not cands:
        raise ValueError("candidates must not be empty")
    m = min(rows.n, int(sample_size))
    if m < 3:
        raise ValueError(f"estimate_k needs at least 3 points, got {m}")
    bad = [c for c in cands if not 2 <= c <= m - 1]
    if bad:
        raise ValueError(f"candidate K values {bad} are outside [2, {m - 1}] for a subsample of {m} points")
    idx = np.sort(np.random.default_rng([seed, 3]).choice(rows.n, size=m, replace=False))
    sub = rows.gather(idx if m < rows.n else None, torch.device("cpu")).numpy()
    base = cfg if cfg is not None else KMeansConfig(k=cands[0], seed=seed)
    metric = "cosine" if base.spherical else "euclidean"
    scores: dict[int, float] = {}
    for c in cands:
        labels = fit_kmeans(sub, replace(base, k=c)).labels
        n_used = len(np.unique(labels))
        scores[c] = float(silhouette_score(sub, labels, metric=metric)) if 2 <= n_used <= m - 1 else float("-inf")
    best = max(cands, key=lambda c: (scores[c], -c))  # ties: the smaller K
    return KEstimate(k=best, scores=scores, method=f"silhouette-{metric}", sample_size=m)
