"""The FAISS backend: ``faiss.Kmeans`` (all visible GPUs with faiss-gpu, else CPU) seeded with our k-means++.

FAISS trains on at most ``k * max_points_per_centroid`` points and ignores the rest, so every point is assigned
afterwards with a batched flat-index search.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segue_dist.kmeans.config import MAX_SEED, KMeansConfig, KMeansResult
from segue_dist.kmeans.exact import LocalComm
from segue_dist.kmeans.init import initial_centroids, train_rows
from segue_dist.kmeans.rows import Rows, scan_rows

# Rows per FAISS search call: bounds the float32 copy of the queries and the (n, 1) outputs.
_FAISS_SEARCH_ROWS = 65536


def load_faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_num_gpus(faiss: Any) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def fit_faiss(rows: Rows, cfg: KMeansConfig, ngpu: int) -> KMeansResult:
    faiss = load_faiss()
    assert faiss is not None
    scan_rows(rows, torch.device("cpu"), LocalComm())  # the torch backend's check: FAISS would abort in C++
    n, d = rows.n, rows.d
    # Subsample ourselves (same global-index rule as the torch backend) so FAISS never subsamples silently and
    # n_train is known; FAISS then sees at most k * max_points_per_centroid points.
    train_idx = train_rows(n, cfg)
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
            init = initial_centroids(xt_t, 0, n_train, cfg, redo, LocalComm(), max_sq).numpy()
        km = faiss.Kmeans(
            d,
            cfg.k,
            niter=cfg.niter,
            nredo=1,
            seed=(cfg.seed + redo) % (MAX_SEED + 1),
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
