"""K-means settings and results, shared by every backend: `KMeansConfig`, `KMeansResult`, `KEstimate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Backend = Literal["auto", "faiss", "torch"]
GpuPolicy = Literal["auto", "never", "always"]
Init = Literal["kmeans++", "random"]
ArrayLike = np.ndarray | torch.Tensor

# faiss' ClusteringParameters.seed is a C int.
MAX_SEED = 2**31 - 1
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class KMeansConfig:
    """K-means settings shared by all backends.

    ``spherical`` is for L2-normalised features: centroids are re-normalised after every update and points go to
    the centroid with the largest inner product (inputs are *not* normalised here; normalise features first).
    ``max_points_per_centroid`` caps the training sample at ``k * max_points_per_centroid`` points, as in FAISS;
    all points are labelled regardless.

    ``init='kmeans++'`` (default) seeds with D^2 sampling on a random subset of ``k * init_points_per_centroid``
    training points: plain random seeding (FAISS' default, ``init='random'``) often puts two centroids in one
    identity and merges two others, a local minimum Lloyd never leaves, and Segue needs accuracy above 0.8. The subset
    bounds the sequential k-means++ cost at O(k^2 * init_points_per_centroid * d) instead of O(k * n * d); with
    imbalanced cluster sizes 32 points per centroid matched scikit-learn's full-data k-means++ in accuracy, where 8
    lost some (small clusters got no candidate; docs/measurements.md). ``chunk_bytes`` bounds the working memory of one block of the
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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

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
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"KMeansConfig.seed must be in [0, {MAX_SEED}] (FAISS takes a C int), got {self.seed}")
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
