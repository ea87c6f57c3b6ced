"""The public entry points: `fit_kmeans` (backend choice), `fit_kmeans_distributed` and `assign`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from segue_dist.kmeans.config import DEFAULT_CHUNK_BYTES, ArrayLike, GpuPolicy, KMeansConfig, KMeansResult
from segue_dist.kmeans.exact import DistComm, LocalComm
from segue_dist.kmeans.faiss_backend import faiss_num_gpus, fit_faiss, load_faiss
from segue_dist.kmeans.lloyd import lloyd
from segue_dist.kmeans.rows import Rows, aligned_blocks, best_scores, block_rows, ieee_fp32_matmul
from segue_dist.utils.device import best_device, resolve_device


def torch_device(policy: GpuPolicy, device: torch.device | str | None, rows: Rows | None) -> torch.device:
    """The torch backend's device: ``device`` when given (`utils.device.resolve_device`: ValueError when it names
    CUDA and there is none), else the rows' own GPU, else by ``policy`` (``KMeansConfig.gpu``): 'never' the CPU,
    'auto' `utils.device.best_device`, 'always' that GPU or RuntimeError without one."""
    if device is not None:
        return resolve_device(str(device))
    if rows is not None and rows.is_cuda and policy != "never":
        assert isinstance(rows.x, torch.Tensor)
        return rows.x.device
    if policy == "never":
        return torch.device("cpu")
    chosen = best_device()
    if policy == "always" and chosen.type != "cuda":
        raise RuntimeError("KMeansConfig.gpu='always' but no CUDA device is available to torch")
    return chosen


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
    rows = Rows(x)
    if cfg.k > rows.n:
        raise ValueError(f"k={cfg.k} clusters requested for only N={rows.n} points (k must be <= N)")
    faiss = load_faiss() if cfg.backend in ("auto", "faiss") else None
    ngpu = faiss_num_gpus(faiss) if faiss is not None and cfg.gpu != "never" else 0

    if cfg.backend == "faiss":
        if faiss is None:
            raise ImportError("KMeansConfig.backend='faiss' but faiss is not installed (pip install faiss-cpu)")
        if device is not None:
            raise ValueError("device applies to the torch backend; use KMeansConfig.gpu for FAISS")
        if cfg.gpu == "always" and ngpu == 0:
            raise RuntimeError("KMeansConfig.gpu='always' but faiss sees no GPU (install a faiss-gpu build)")
        return fit_faiss(rows, cfg, ngpu)

    use_torch = (
        cfg.backend == "torch"
        or device is not None
        or faiss is None
        or (ngpu == 0 and cfg.gpu != "never" and (torch.cuda.is_available() or rows.is_cuda))
    )
    if not use_torch:
        if cfg.gpu == "always" and ngpu == 0:
            raise RuntimeError("KMeansConfig.gpu='always' but neither faiss nor torch sees a GPU")
        return fit_faiss(rows, cfg, ngpu)
    dev = torch_device(cfg.gpu, device, rows)
    return lloyd(rows, 0, rows.n, cfg, dev, LocalComm())


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
    comm = DistComm(group)
    rows = Rows(local_x, allow_empty=True)
    if device is None:
        if comm.device.type == "cuda":
            device = comm.device
        elif cfg.gpu == "always":
            device = torch_device("always", None, None)
        else:
            device = torch.device("cpu")
    dev = torch_device(cfg.gpu, device, rows)
    gathered = comm.all_gather_ints([rows.n, rows.d])
    counts = [g[0] for g in gathered]
    dims = {g[1] for g in gathered}
    if len(dims) != 1:
        raise ValueError(f"feature dimension differs between processes: {[g[1] for g in gathered]}")
    n_total = sum(counts)
    if cfg.k > n_total:
        raise ValueError(f"k={cfg.k} clusters requested for only N={n_total} points in total (k must be <= N)")
    offset = sum(counts[: comm.rank])
    return lloyd(rows, offset, n_total, cfg, dev, comm)


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
    rows = Rows(x)
    c = Rows(centroids)
    if c.d != rows.d:
        raise ValueError(f"centroids have dimension {c.d}, x has {rows.d}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dev = torch_device("auto", device, rows)
    cent = c.gather(None, dev)
    k = c.n
    block = chunk if chunk is not None else block_rows(DEFAULT_CHUNK_BYTES, k, rows.d, rows.n)
    block = min(block, rows.n)
    labels = torch.empty(rows.n, dtype=torch.int64, device=dev)
    scores = torch.empty(rows.n, dtype=torch.float32, device=dev)
    neg_sqnorm = None if spherical else -(cent * cent).sum(dim=1)
    with ieee_fp32_matmul():
        for start, take, row0, buf in aligned_blocks(rows, 0, block, dev):
            best, lab = best_scores(buf, cent, neg_sqnorm)
            labels[start : start + take] = lab[row0 : row0 + take]
            best = best[row0 : row0 + take]
            if not spherical:  # |x - c|^2 = |x|^2 - (2x.c - |c|^2)
                best = ((buf[row0 : row0 + take] ** 2).sum(dim=1) - best).clamp_min(0.0)
            scores[start : start + take] = best
    return labels.cpu().numpy(), scores.cpu().numpy()
