"""K-means for Segue's pseudo-labels: FAISS, pure torch (CPU or CUDA) and multi-process Lloyd.

Segue (unsupervised scenario) clusters L2-normalised face features into K groups and uses the cluster ids as
side information; it works as long as clustering accuracy exceeds the paper's 0.8, so the clustering has to be
good *and* every image has to get a label.

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

Modules: `config` (settings and results), `rows` (input rows, score blocks and `scan_rows`, the one input check
of every backend), `exact` (collectives and fixed-point sums), `init` (training subsample, k-means++), `lloyd`
(the torch algorithm), `faiss_backend`, `fit` (backend choice, `fit_kmeans_distributed`, `assign`), `select_k`
(`estimate_k`, `overcluster_k`).

Assignment is done in float32 with TF32/bf16 matmul disabled for the duration: reduced precision changes which
centroid wins near-ties, and such labels would not be reproducible across devices.
"""

from __future__ import annotations

from segue_dist.kmeans.config import ArrayLike, Backend, GpuPolicy, Init, KEstimate, KMeansConfig, KMeansResult
from segue_dist.kmeans.fit import assign, fit_kmeans, fit_kmeans_distributed
from segue_dist.kmeans.init import kmeanspp
from segue_dist.kmeans.select_k import estimate_k, overcluster_k

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
    "kmeanspp",
    "overcluster_k",
]
