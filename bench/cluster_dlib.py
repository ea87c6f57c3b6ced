"""Clustering quality of the dlib face descriptor on real faces: LFW-62 (and lfw423), against the true identities.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/cluster_dlib.py --name lfw62 --min-per-identity 20 \
        --k 62 --out bench/results/cluster_dlib/lfw62.json
    ... --name lfw62_pipeline64 --min-per-identity 20 --max-per-identity 50 --test-per-identity 5 --size 64 --k 62 \
        --out bench/results/cluster_dlib/lfw62_pipeline64.json   (the README's LFW-62 training shards)
    ... --name lfw423 --min-per-identity 5 --k 423 --out bench/results/cluster_dlib/lfw423.json

Builds the shard set at the stored size (no resize: dlib detects and aligns the face itself) under --work (ignored
by git), embeds it once with the cluster stage's own feature code (one process: the figure is faces/s per core),
then clusters the same cached features several ways: spherical K-means with the true K (the paper's setting),
over-clustering (m*K clusters: purity is the figure that matters there, one-to-one accuracy drops by design) and
the silhouette estimate of K. A rerun reuses the shards and features.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segue_dist.cluster import extract_features, load_feature_model, load_features  # noqa: E402
from segue_dist.data.loader import open_shard_set  # noqa: E402
from segue_dist.kmeans import KMeansConfig, estimate_k, fit_kmeans, overcluster_k  # noqa: E402
from segue_dist.metrics.clustering import clustering_report  # noqa: E402
from segue_dist.shards import ShardsConfig, build_shards  # noqa: E402
from segue_dist.utils.io import atomic_write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def features(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Shards + dlib features (cached under ``work``); timing only counts shards embedded in this call."""
    shards = work / "shards"
    if not (shards / "train" / "sizes.json").is_file():
        cfg = ShardsConfig(
            src=str(Path(args.faces) / "lfw423"),
            out=str(shards),
            min_per_identity=args.min_per_identity,
            max_per_identity=args.max_per_identity,
            test_per_identity=args.test_per_identity,
            size=[args.size] if args.size else [],
            samples_per_shard=args.samples_per_shard,
            workers=1,
        )
        build_shards(cfg, show_progress=False)
    model, meta = load_feature_model("dlib")
    t0, cpu0 = time.perf_counter(), time.process_time()
    # num_workers=0: decoding in this process too, so its CPU time is the whole per-face cost.
    counts = extract_features(str(shards / "train"), model, work, image_size=None, num_workers=0)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    embedded = counts["samples"]
    return {
        "counts": counts,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        # Per core = per CPU-second of this one process: on a shared machine wall time also counts other jobs.
        "faces_per_cpu_second": embedded / cpu_seconds if embedded else None,
        "faces_per_wall_second": embedded / seconds if embedded else None,
        "feature_model_sha256": meta["sha256"],
    }


def cluster_rows(work: Path, k: int, overcluster: list[float], seed: int, estimate: bool) -> dict[str, Any]:
    names = sorted(Path(s).name for s in open_shard_set(work / "shards" / "train").shards)
    x, _, truth = load_features(work, names)
    rows: dict[str, Any] = {}
    for m in [1.0, *overcluster]:
        kk = overcluster_k(k, m)
        t0 = time.perf_counter()
        labels = fit_kmeans(x, KMeansConfig(k=kk, seed=seed)).labels
        rows[f"k={kk} (m={m:g})"] = {**clustering_report(truth, labels), "seconds": time.perf_counter() - t0}
    if estimate:
        candidates = sorted({max(2, round(k * f)) for f in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)})
        est = estimate_k(x, candidates, seed=seed)
        labels = fit_kmeans(x, KMeansConfig(k=est.k, seed=seed)).labels
        rows["estimate_k"] = {
            "k": est.k,
            "true_k": k,
            "scores": {str(c): s for c, s in est.scores.items()},
            "method": est.method,
            **clustering_report(truth, labels),
        }
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--faces", default=os.environ.get("SEGUE_FACES", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--min-per-identity", type=int, default=20)
    parser.add_argument("--max-per-identity", type=int, default=0)
    parser.add_argument("--test-per-identity", type=int, default=0, help="held out (not clustered), as a pipeline does")
    parser.add_argument("--size", type=int, default=0, help="resize the shards (0 = stored size)")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--k", type=int, required=True, help="the true number of identities")
    parser.add_argument("--overcluster", type=float, nargs="*", default=[1.5, 2.0])
    parser.add_argument("--no-estimate-k", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="", help="shards + features cache (default runs/bench_cluster_dlib/NAME)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work or REPO / "runs" / "bench_cluster_dlib" / args.name)
    feats = features(args, work)
    result = {
        "name": args.name,
        "extractor": "dlib (HOG + 5-point alignment + ResNet descriptor, face-recognition-models 0.3.0)",
        "selection": {
            "min_per_identity": args.min_per_identity,
            "max_per_identity": args.max_per_identity,
            "test_per_identity": args.test_per_identity,
            "size": args.size or "stored (250 px)",
        },
        "features": feats,
        "clustering": cluster_rows(work, args.k, args.overcluster, args.seed, not args.no_estimate_k),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "processes": 1,
            "loadavg_at_end": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    atomic_write_json(Path(args.out), result)
    print(f"{args.name}: {result['clustering']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
