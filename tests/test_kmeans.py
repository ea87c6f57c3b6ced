"""K-means backends, the distributed/single-process equality contract, and clustering metrics."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import segue_dist.kmeans.lloyd as lloyd_module
from segue_dist.kmeans import (
    KMeansConfig,
    assign,
    estimate_k,
    fit_kmeans,
    fit_kmeans_distributed,
    kmeanspp,
    overcluster_k,
)
from segue_dist.kmeans.init import init_positions
from segue_dist.kmeans.lloyd import refill_empty
from segue_dist.kmeans.rows import ieee_fp32_matmul
from segue_dist.metrics.clustering import (
    SEGUE_ACCURACY_THRESHOLD,
    ari,
    cluster_accuracy,
    clustering_report,
    contingency_matrix,
    hungarian_mapping,
    nmi,
    purity,
)

HAS_FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = [
    pytest.param("faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")),
    "torch",
]


def sphere_blobs(
    n: int = 2000, k: int = 20, d: int = 64, noise: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm points around k random unit centres; noise is the expected norm of the perturbation."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])  # every cluster present, uneven sizes
    x = centres[y] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.int64)


def sse(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    diff = x.astype(np.float64) - centroids.astype(np.float64)[labels]
    return float((diff * diff).sum())


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    return sphere_blobs()


# ---------------------------------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_recover_blobs(backend: str, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """Bound: torch and FAISS both measured 1.0 with AVX-512 and AVX2 kernels (the project's 2-core AMD EPYC); 0.99
    allows one stray point in a hundred."""
    x, y = blobs
    res = fit_kmeans(x, KMeansConfig(k=20, backend=backend, nredo=3, gpu="never"))
    assert res.backend == backend
    assert res.labels.shape == (len(x),) and res.labels.dtype == np.int64
    assert res.centroids.shape == (20, 64) and res.centroids.dtype == np.float32
    assert cluster_accuracy(y, res.labels) >= 0.99
    np.testing.assert_array_equal(res.sizes, np.bincount(res.labels, minlength=20))
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, rtol=1e-5)  # spherical
    assert res.inertia == pytest.approx(sse(x, res.labels, res.centroids), rel=1e-5)
    assert res.n_train == len(x) and res.n_points == len(x)


def test_random_init_and_l2_mode_recover_blobs(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """Bound: measured 0.954 with AVX-512 and AVX2 kernels alike (the project's 2-core AMD EPYC); the 0.95 bound
    has less than half a point of margin, so a change that makes it fail deserves a look before the bound moves."""
    x, y = blobs
    res = fit_kmeans(x, KMeansConfig(k=20, backend="torch", spherical=False, init="random", nredo=8))
    assert cluster_accuracy(y, res.labels) >= 0.95
    # L2 mode: centroids are plain means, strictly inside the unit ball for spread clusters.
    assert np.linalg.norm(res.centroids, axis=1).max() < 1.0
    assert res.objective == pytest.approx(res.objective_history[-1])
    assert res.inertia == pytest.approx(sse(x, res.labels, res.centroids), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_point_labelled_beyond_training_cap(backend: str) -> None:
    x, _ = sphere_blobs(n=5000, k=4, d=16, noise=0.5, seed=1)
    cfg = KMeansConfig(k=4, max_points_per_centroid=8, backend=backend, gpu="never")
    res = fit_kmeans(x, cfg)
    assert res.n_train == 32 and res.n_points == 5000
    assert res.labels.shape == (5000,)
    assert res.sizes.sum() == 5000
    # Labels are the nearest centroid (max inner product) for every point, not only the training sample.
    scores = x @ res.centroids.T
    best = scores.max(axis=1)
    assert np.all(scores[np.arange(len(x)), res.labels] >= best - 1e-5)
    if backend == "torch":  # same kernels as assign(): bitwise equal
        np.testing.assert_array_equal(res.labels, assign(x, res.centroids, spherical=True)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_seed_is_deterministic(backend: str, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    cfg = KMeansConfig(k=20, seed=3, backend=backend, gpu="never", max_points_per_centroid=50)
    a, b = fit_kmeans(x, cfg), fit_kmeans(x, cfg)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.objective == b.objective


def test_seed_changes_training_sample_and_init(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    base = KMeansConfig(k=20, backend="torch", max_points_per_centroid=10, niter=1)
    a = fit_kmeans(x, base)
    b = fit_kmeans(x, KMeansConfig(k=20, backend="torch", max_points_per_centroid=10, niter=1, seed=1))
    assert not np.array_equal(a.centroids, b.centroids)


def test_input_types_and_dtypes_agree(blobs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, _ = blobs
    cfg = KMeansConfig(k=20, backend="torch", max_points_per_centroid=40)
    ref = fit_kmeans(x, cfg)
    # torch tensor input
    np.testing.assert_array_equal(fit_kmeans(torch.from_numpy(x), cfg).labels, ref.labels)
    # float64 input is converted to float32 (exactly representable here, so identical results)
    np.testing.assert_array_equal(fit_kmeans(x.astype(np.float64), cfg).labels, ref.labels)
    # read-only memmap, streamed block by block
    path = tmp_path / "x.f32"
    x.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    np.testing.assert_array_equal(fit_kmeans(mm, cfg).labels, ref.labels)
    # small score blocks change nothing but memory
    small = fit_kmeans(x, KMeansConfig(k=20, backend="torch", max_points_per_centroid=40, chunk_bytes=64 * 1024))
    np.testing.assert_array_equal(small.centroids, ref.centroids)


def test_kmeanspp_seeds_distinct_points_and_is_seeded() -> None:
    x, y = sphere_blobs(n=600, k=12, d=16, noise=0.2, seed=4)
    pts = torch.from_numpy(x)
    a = kmeanspp(pts, 12, np.random.default_rng(1), 1.0)
    b = kmeanspp(pts, 12, np.random.default_rng(1), 1.0)
    assert torch.equal(a, b)
    # greedy D^2 seeding on well separated blobs puts one seed in each blob
    seeds = [int(np.nonzero((x == s.numpy()).all(axis=1))[0][0]) for s in a]
    assert len(set(y[seeds])) == 12
    # fewer distinct points than seeds: no crash, duplicates allowed (empty clusters are refilled later)
    few = kmeanspp(torch.eye(3).repeat(4, 1), 5, np.random.default_rng(0), 1.0)
    assert few.shape == (5, 3)


def test_empty_clusters_are_refilled_by_splitting_the_worst_cluster() -> None:
    cent = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([50, 0, 4, 0])
    sse = torch.tensor([0.0, 0.0, 3.0, 0.0], dtype=torch.float64)  # cluster 0: 50 identical points
    cfg = KMeansConfig(k=4)
    a = cent.clone()
    assert refill_empty(a, counts, sse, cfg, redo=0, it=0, data_scale=1.0) == 2
    assert torch.equal(a[0], cent[0])  # largest but unsplittable: left alone
    # cluster 2 is split (error 3 -> 1.5 + 1.5 for both halves), then its lowest-index half (1) again: all copies
    # close to the old centroid, pairwise distinct, the first split orthogonal to it (equal norms, so spherical
    # renormalisation keeps the boundary through the old centroid)
    copies = a[[1, 2, 3]]
    assert torch.all(torch.linalg.vector_norm(copies - cent[2], dim=1) < 0.01)
    assert len({tuple(c.tolist()) for c in copies}) == 3
    assert abs(float((a[2] - cent[2]) @ cent[2])) < 1e-12
    b = cent.clone()
    refill_empty(b, counts, sse, cfg, redo=0, it=0, data_scale=1.0)
    assert torch.equal(a, b)  # deterministic
    # nothing splittable at all: fall back to the most populated cluster rather than doing nothing
    c = cent.clone()
    assert refill_empty(c, counts, torch.zeros(4, dtype=torch.float64), cfg, 0, 0, 1.0) == 2
    assert torch.all(torch.linalg.vector_norm(c[[1, 3]] - cent[0], dim=1) < 0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_seeds_leave_no_empty_cluster(backend: str) -> None:
    # Three distinct points, each repeated: random seeding often picks two copies of the same point, whose
    # second centroid then gets nothing (ties go to the lower index) and must be refilled.
    values = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    y = np.repeat(np.arange(3), [60, 30, 10])
    x = values[y]
    seed = next(
        s for s in range(1000) if len(set(y[init_positions(len(x), KMeansConfig(k=3, seed=s, init="random"), 0)])) < 3
    )
    res = fit_kmeans(x, KMeansConfig(k=3, seed=seed, init="random", backend=backend, gpu="never"))
    assert np.all(res.sizes > 0)
    assert cluster_accuracy(y, res.labels) == 1.0


def test_assign_blocks_ties_and_l2_scores() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    c = rng.standard_normal((7, 8)).astype(np.float32)
    full_l, full_s = assign(x, c, spherical=False)
    for chunk in (1, 13, 999, 5000):
        lab, sc = assign(x, c, spherical=False, chunk=chunk)
        np.testing.assert_array_equal(lab, full_l)
        # Same labels, but scores may differ in the last bit: BLAS picks kernels by matrix shape. This is why the
        # K-means backend computes fixed-shape, globally aligned blocks. The score is |x|^2 - 2 x.c + |c|^2 in float32,
        # so its error scales with |x|^2 + |c|^2 (~16 here), not with the (small) distance: hence the absolute term.
        np.testing.assert_allclose(sc, full_s, rtol=1e-6, atol=1e-5)
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(full_l, d2.argmin(1))
    np.testing.assert_allclose(full_s, d2.min(1), rtol=1e-4, atol=1e-4)
    # exact ties resolve to the lowest centroid index
    lab, _ = assign(np.ones((3, 2), np.float32), np.ones((4, 2), np.float32), spherical=True)
    np.testing.assert_array_equal(lab, [0, 0, 0])


def test_assign_forces_full_fp32_and_restores_setting() -> None:
    ns = torch.backends.cuda.matmul
    if not hasattr(ns, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision setting")
    before = ns.fp32_precision
    ns.fp32_precision = "tf32"
    try:
        with ieee_fp32_matmul():
            assert ns.fp32_precision == "ieee"
        assign(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32))
        assert ns.fp32_precision == "tf32"
    finally:
        ns.fp32_precision = before


def test_config_and_input_validation(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    for bad in (
        {"k": 0},
        {"k": True},
        {"k": 2.5},
        {"k": 2, "niter": 0},
        {"k": 2, "nredo": 0},
        {"k": 2, "seed": -1},
        {"k": 2, "max_points_per_centroid": 0},
        {"k": 2, "backend": "sklearn"},
        {"k": 2, "gpu": "maybe"},
        {"k": 2, "init": "kmeans||"},
        {"k": 2, "spherical": 1},
    ):
        with pytest.raises(ValueError, match=r"KMeansConfig\."):
            KMeansConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k=30 .* N=20"):
        fit_kmeans(x[:20], KMeansConfig(k=30, backend="torch"))
    with pytest.raises(ValueError, match="2-D"):
        fit_kmeans(x[0], KMeansConfig(k=1))
    with pytest.raises(ValueError, match="floating"):
        fit_kmeans(np.ones((10, 2), dtype=np.int64), KMeansConfig(k=1))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            fit_kmeans(x, KMeansConfig(k=3, backend="torch", gpu="always"))
    with pytest.raises(RuntimeError, match="initialised"):
        fit_kmeans_distributed(x, KMeansConfig(k=3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("row", [5, 99], ids=["trained-row", "row-outside-the-sample"])
def test_non_finite_features_are_one_clear_error_on_every_backend(
    backend: str, value: float, row: int, blobs: tuple[np.ndarray, np.ndarray]
) -> None:
    # FAISS used to abort with a raw C++ assertion here. A training sample of 30 rows (k x 10) leaves most rows
    # out of training: they must be checked too, or they would silently get a label.
    x = blobs[0][:100].copy()
    x[row, 3] = value
    cfg = KMeansConfig(k=3, backend=backend, gpu="never", max_points_per_centroid=10)
    with pytest.raises(ValueError, match=r"^x contains NaN or infinite values$"):
        fit_kmeans(x, cfg)
    with pytest.raises(ValueError, match=r"^x contains NaN or infinite values$"):
        fit_kmeans(torch.from_numpy(x), cfg)


def test_estimate_k_and_overcluster(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = sphere_blobs(n=1500, k=10, d=32, noise=0.3, seed=2)
    est = estimate_k(x, [5, 10, 20, 40], KMeansConfig(k=2, backend="torch", nredo=2), sample_size=1000)
    assert est.k == 10
    assert set(est.scores) == {5, 10, 20, 40} and est.sample_size == 1000
    with pytest.raises(ValueError, match="outside"):
        estimate_k(x, [1, 10])
    assert overcluster_k(10, 2) == 20
    assert overcluster_k(10, 1.5) == 15
    with pytest.raises(ValueError):
        overcluster_k(10, 0.5)
    with pytest.raises(ValueError):
        overcluster_k(0, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda_quality_determinism_and_tf32_immunity(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    cfg = KMeansConfig(k=20, backend="torch", nredo=3)
    res = fit_kmeans(torch.from_numpy(x).cuda(), cfg)  # a CUDA tensor selects its device
    assert res.device.startswith("cuda")
    assert cluster_accuracy(y, res.labels) >= 0.99
    ns = torch.backends.cuda.matmul
    before = ns.fp32_precision
    try:
        torch.use_deterministic_algorithms(True)
        ns.fp32_precision = "tf32"  # as training code often sets it: must not change the clustering
        again = fit_kmeans(x, cfg, device="cuda")
    finally:
        torch.use_deterministic_algorithms(False)
        ns.fp32_precision = before
    np.testing.assert_array_equal(again.labels, res.labels)
    np.testing.assert_array_equal(again.centroids, res.centroids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kmeanspp_cuda_graph_is_bitwise_the_eager_loop() -> None:
    pts = torch.nn.functional.normalize(torch.randn(4000, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    pts = pts.cuda()
    eager = kmeanspp(pts, 200, np.random.default_rng(5), 1.0, graph=False)
    graphed = kmeanspp(pts, 200, np.random.default_rng(5), 1.0, graph=True)
    assert torch.equal(eager, graphed)


# ---------------------------------------------------------------------------------------------- distributed

SHARDS = (0, 1300, 2000)  # uneven: 1300 and 700 points
DIST_CONFIGS = (
    KMeansConfig(k=20, nredo=2, backend="torch"),  # spherical, greedy k-means++, every point trains
    # L2, random seeding, training subsample (k * 4 = 240 of 2000 points spread over both shards); this seed
    # empties clusters, so the split path runs under sharding too (checked below)
    KMeansConfig(k=60, spherical=False, init="random", max_points_per_centroid=4, niter=30, seed=2, backend="torch"),
)


def _dist_worker(rank: int, init_file: str, out_dir: str, device: str) -> None:
    torch.set_num_threads(1)  # 2 cores, 2 processes; also shows the result does not depend on thread count
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        assert dist.get_world_size() == 2
        x, _ = sphere_blobs()
        local = x[SHARDS[rank] : SHARDS[rank + 1]]
        out = {}
        for i, cfg in enumerate(DIST_CONFIGS):
            res = fit_kmeans_distributed(local, cfg, device=device)
            assert (
                res.world_size == 2
                and res.device.startswith(device)
                and res.offset == SHARDS[rank]
                and res.n_points == len(x)
            )
            out.update(
                {
                    f"labels{i}": res.labels,
                    f"centroids{i}": res.centroids,
                    f"sizes{i}": res.sizes,
                    f"scalars{i}": np.array([res.inertia, res.objective, res.iterations, res.n_train]),
                }
            )
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_two_gloo_processes_equal_single_process(
    device: str, blobs: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, _ = blobs
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(os.path.join(tmp, "init"), tmp, device), nprocs=2, join=True)
        shards = [dict(np.load(os.path.join(tmp, f"rank{r}.npz"))) for r in range(2)]
    splits: list[int] = []
    refill = refill_empty  # a spy: the real refill runs, the test counts its splits
    monkeypatch.setattr(lloyd_module, "refill_empty", lambda *a, **kw: splits.append(refill(*a, **kw)) or splits[-1])
    for i, cfg in enumerate(DIST_CONFIGS):
        splits.clear()
        ref = fit_kmeans(x, cfg, device=device)
        if i == 1:
            assert sum(splits) > 0, "config 1 should exercise empty-cluster splitting"
        labels = np.concatenate([s[f"labels{i}"] for s in shards])
        np.testing.assert_array_equal(labels, ref.labels)
        for s in shards:
            np.testing.assert_array_equal(s[f"centroids{i}"], ref.centroids)
            np.testing.assert_array_equal(s[f"sizes{i}"], ref.sizes)
            np.testing.assert_array_equal(s[f"scalars{i}"], [ref.inertia, ref.objective, ref.iterations, ref.n_train])
    assert shards[0]["scalars1"][3] == 240  # the subsampled config really subsampled


# ---------------------------------------------------------------------------------------------- metrics


def labels_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) realising contingency matrix cm[cluster, class]."""
    pred, true = [], []
    for i, j in np.ndindex(cm.shape):
        pred += [i] * int(cm[i, j])
        true += [j] * int(cm[i, j])
    return np.array(true), np.array(pred)


def test_perfect_permutation_scores_one() -> None:
    y = np.repeat(np.arange(5), 4)
    perm = np.array([3, 0, 4, 1, 2])
    pred = perm[y] + 100  # relabelled, non-contiguous ids
    rep = clustering_report(y, pred)
    assert rep["accuracy"] == rep["purity"] == 1.0
    assert rep["nmi"] == pytest.approx(1.0) and rep["ari"] == pytest.approx(1.0)
    assert rep["meets_segue_threshold"] is True
    assert hungarian_mapping(y, pred) == {int(perm[c]) + 100: c for c in range(5)}


def test_hungarian_accuracy_on_known_confusion() -> None:
    # rows: clusters, columns: classes. Best one-to-one: 5 + 3 + 7 = 15 of 20. Purity lets clusters 0 and 1
    # both vote for class 0: 5 + 4 + 7 = 16.
    cm = np.array([[5, 1, 0], [4, 3, 0], [0, 0, 7]])
    y_true, y_pred = labels_from_confusion(cm)
    np.testing.assert_array_equal(contingency_matrix(y_true, y_pred), cm)
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(0.75)
    assert purity(y_true, y_pred) == pytest.approx(0.8)
    assert hungarian_mapping(y_true, y_pred) == {0: 0, 1: 1, 2: 2}


def test_overclustering_purity_vs_accuracy() -> None:
    y_true = np.repeat([0, 1], 10)
    y_pred = np.repeat([0, 1, 2, 3], 5)  # every class split into two pure halves
    rep = clustering_report(y_true, y_pred)
    assert rep["purity"] == 1.0
    assert rep["accuracy"] == 0.5
    assert rep["n_clusters"] == 4 and rep["n_classes"] == 2 and rep["n_samples"] == 20
    assert rep["meets_segue_threshold"] is False
    # under-clustering: two classes merged into one cluster
    merged = clustering_report(np.repeat([0, 1, 2], 4), np.repeat([0, 0, 1], 4))
    assert merged["accuracy"] == merged["purity"] == pytest.approx(8 / 12)


def test_threshold_is_strict_and_metrics_validate_input() -> None:
    assert SEGUE_ACCURACY_THRESHOLD == 0.8
    y_true = np.zeros(10, dtype=int)
    y_true[8:] = 1
    y_pred = np.zeros(10, dtype=int)  # accuracy exactly 0.8: not "exceeds 80%"
    assert clustering_report(y_true, y_pred)["accuracy"] == pytest.approx(0.8)
    assert clustering_report(y_true, y_pred)["meets_segue_threshold"] is False
    assert clustering_report(["a", "b", "b"], [7, 9, 9])["accuracy"] == 1.0
    assert nmi(y_true, y_pred) == pytest.approx(0.0) and ari(y_true, y_pred) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="length"):
        cluster_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        purity([], [])
    with pytest.raises(ValueError, match="threshold"):
        clustering_report([0], [0], threshold=1.5)


def test_kmeans_pseudo_labels_pass_segue_threshold(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    res = fit_kmeans(x, KMeansConfig(k=20, backend="torch", nredo=3))
    assert clustering_report(y, res.labels)["meets_segue_threshold"] is True
    rng = np.random.default_rng(0)
    assert clustering_report(y, rng.integers(0, 20, len(y)))["meets_segue_threshold"] is False
