"""Choosing K: over-clustering (`overcluster_k`) and the silhouette estimate (`estimate_k`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from segue_dist.kmeans.config import ArrayLike, KEstimate, KMeansConfig
from segue_dist.kmeans.fit import fit_kmeans
from segue_dist.kmeans.rows import Rows


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

    rows = Rows(x)
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
