"""K-means benchmark: segue_dist FAISS / torch backends against scikit-learn KMeans and MiniBatchKMeans.

CPU (default): N=100k, D=128, K=1000, 20 iterations.
    .venv/bin/python bench/kmeans.py --out bench/results/kmeans_cpu.json
GPU (--gpu): N=1M, D=512, K=10k, 20 iterations; FAISS-GPU when faiss sees a GPU, else the torch CUDA path.
    python bench/kmeans.py --gpu --out /tmp/kmeans_gpu.json

Every method clusters the same seeded data; the inertia of each is recomputed here the same way (sum of squared
L2 distances of all N points to their assigned centroid, float64), and ACC/NMI are measured against the
generating clusters (noise points excluded). Wall time covers fitting and labelling every point.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segue_dist.kmeans import KMeansConfig, fit_kmeans  # noqa: E402
from segue_dist.metrics.clustering import cluster_accuracy, nmi  # noqa: E402
from segue_dist.utils.io import atomic_write_json  # noqa: E402

CPU_METHODS = (
    "faiss",
    "faiss-spherical",
    "torch",
    "torch-spherical",
    "sklearn-kmeans",
    "sklearn-minibatch",
)
GPU_METHODS = ("faiss-gpu", "torch-cuda", "torch-cuda-spherical")
# Hungarian matching is O(K^3) on a dense K x K table: skip ACC beyond this many clusters (NMI stays).
MAX_K_FOR_ACC = 2000


@dataclass
class Data:
    x: torch.Tensor  # (N, D) float32, unit norm, on the bench device
    y: np.ndarray  # (N,) generating cluster, -1 for noise points


def make_data(n: int, d: int, k_true: int, noise_frac: float, spread: float, seed: int, device: str) -> Data:
    """Face-embedding-like mixture on the unit sphere, seeded.

    k_true random unit centres with imbalanced sizes (log-normal weights, like identities with few and many
    images) and per-cluster spreads (log-normal around ``spread``: expected norm of the perturbation before
    renormalisation; 0.8 gives cos(x, centre) of about 0.78), plus a fraction of uniform noise points on the sphere.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k_true, d, generator=gen, device=device), dim=1)
    weights = torch.exp(0.5 * torch.randn(k_true, generator=gen, device=device))
    sigmas = spread * torch.exp(0.25 * torch.randn(k_true, generator=gen, device=device))
    n_noise = round(noise_frac * n)
    y = torch.full((n,), -1, dtype=torch.int64, device=device)
    y[n_noise:] = torch.multinomial(weights, n - n_noise, replacement=True, generator=gen)
    y = y[torch.randperm(n, generator=gen, device=device)]
    x = torch.empty(n, d, dtype=torch.float32, device=device)
    step = 65536
    for s in range(0, n, step):
        ys = y[s : s + step]
        z = torch.randn(len(ys), d, generator=gen, device=device)
        clustered = ys >= 0
        ci = ys.clamp_min(0)
        pts = torch.where(clustered[:, None], centres[ci] + sigmas[ci, None] * z / d**0.5, z)
        x[s : s + step] = torch.nn.functional.normalize(pts, dim=1)
    return Data(x=x, y=y.cpu().numpy())


def inertia(x: torch.Tensor, labels: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over all points of |x - c_label|^2, float64, computed the same way for every method."""
    c = torch.as_tensor(centroids, dtype=torch.float64, device=x.device)
    lab = torch.as_tensor(labels, dtype=torch.int64, device=x.device)
    total = 0.0
    for s in range(0, len(x), 65536):
        diff = x[s : s + 65536].double() - c[lab[s : s + 65536]]
        total += float((diff * diff).sum())
    return total


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_method(name: str, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Fit one method; returns labels/centroids plus timing and what the method reports about itself."""
    k, niter, seed = args.k, args.niter, args.seed
    if name.startswith(("faiss", "torch")):
        spherical = name.endswith("spherical")
        backend = "faiss" if name.startswith("faiss") else "torch"
        cfg = KMeansConfig(
            k=k,
            niter=niter,
            seed=seed,
            spherical=spherical,
            backend=backend,
            gpu="always" if name in ("faiss-gpu",) or name.startswith("torch-cuda") else "never",
            max_points_per_centroid=args.max_points_per_centroid,
            init_points_per_centroid=args.init_points_per_centroid,
            init=args.init,
        )
        x: Any = data.x if backend == "torch" else data.x.cpu().numpy()
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        res = fit_kmeans(x, cfg)
        _sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {
            "labels": res.labels,
            "centroids": res.centroids,
            "wall_s": wall,
            "cpu_s": cpu,
            "iterations": res.iterations,
            "n_train": res.n_train,
            "device": f"{res.backend}:{res.device}",
            "params": {
                "spherical": spherical,
                "init": cfg.init,
                "init_points_per_centroid": cfg.init_points_per_centroid,
                "max_points_per_centroid": cfg.max_points_per_centroid,
            },
        }
    from sklearn.cluster import KMeans, MiniBatchKMeans

    xn = data.x.cpu().numpy()
    if name == "sklearn-kmeans":
        # Same iteration budget as the others; tol=0 stops only on exact convergence, like the torch backend.
        est: Any = KMeans(
            n_clusters=k, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", init="k-means++", random_state=seed
        )
        params = {"n_init": 1, "max_iter": niter, "tol": 0.0, "algorithm": "lloyd", "init": "k-means++"}
    elif name == "sklearn-minibatch":
        est = MiniBatchKMeans(
            n_clusters=k, n_init=1, max_iter=niter, batch_size=4096, init_size=3 * k, random_state=seed
        )
        params = {"n_init": 1, "max_iter(epochs)": niter, "batch_size": 4096, "init_size": 3 * k}
    else:
        raise ValueError(f"unknown method {name!r}")
    t0, c0 = time.perf_counter(), time.process_time()
    est.fit(xn)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "labels": est.labels_.astype(np.int64),
        "centroids": est.cluster_centers_.astype(np.float32),
        "wall_s": wall,
        "cpu_s": cpu,
        "iterations": int(est.n_iter_),
        "n_train": len(xn),
        "device": "sklearn:cpu",
        "params": params,
    }


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "device": device,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = None
    for mod in ("faiss", "sklearn"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import faiss

        info["faiss_gpus"] = int(faiss.get_num_gpus())
    except (ImportError, AttributeError):
        info["faiss_gpus"] = 0
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU sizes and methods (N=1M, D=512, K=10k by default)")
    p.add_argument("--n", type=int, default=None, help="points (default 100k, or 1M with --gpu)")
    p.add_argument("--d", type=int, default=None, help="dimension (default 128, or 512 with --gpu)")
    p.add_argument("--k", type=int, default=None, help="clusters (default 1000, or 10k with --gpu)")
    p.add_argument("--true-k", type=int, default=None, help="generating clusters (default: K)")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-frac", type=float, default=0.05, help="fraction of uniform noise points")
    p.add_argument("--spread", type=float, default=0.8, help="within-cluster perturbation norm")
    p.add_argument("--max-points-per-centroid", type=int, default=256)
    p.add_argument("--init-points-per-centroid", type=int, default=KMeansConfig(k=1).init_points_per_centroid)
    p.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++", help="seeding of faiss/torch runs")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run")
    p.add_argument("--skip", nargs="+", default=[], help="methods to leave out (e.g. a slow sklearn-kmeans)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (written atomically)")
    args = p.parse_args(argv)
    args.n = args.n or (1_000_000 if args.gpu else 100_000)
    args.d = args.d or (512 if args.gpu else 128)
    args.k = args.k or (10_000 if args.gpu else 1000)
    args.true_k = args.true_k or args.k
    known = GPU_METHODS if args.gpu else CPU_METHODS
    methods = args.methods or list(known)
    unknown = set(methods) | set(args.skip)
    unknown -= set(CPU_METHODS) | set(GPU_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {CPU_METHODS + GPU_METHODS}")
    args.methods = [m for m in methods if m not in args.skip]
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)  # piped output: don't truncate columns
    device = "cuda" if args.gpu else "cpu"
    methods = list(args.methods)
    if args.gpu and "faiss-gpu" in methods:
        try:
            import faiss

            if faiss.get_num_gpus() == 0:
                raise ImportError
        except (ImportError, AttributeError):
            console.print("[yellow]faiss-gpu not available: skipping faiss-gpu, the torch CUDA path runs[/yellow]")
            methods.remove("faiss-gpu")

    t0 = time.perf_counter()
    data = make_data(args.n, args.d, args.true_k, args.noise_frac, args.spread, args.seed, device)
    _sync()
    console.print(f"data: N={args.n} D={args.d} K'={args.true_k} on {device} in {time.perf_counter() - t0:.1f}s")
    if args.gpu:  # CUDA context, cuBLAS handles and kernels loaded outside the timed region
        fit_kmeans(data.x[:4096], KMeansConfig(k=64, niter=2, backend="torch", gpu="always"))
        _sync()

    clustered = data.y >= 0
    rows: list[dict[str, Any]] = []
    for name in methods:
        console.print(f"running {name} ...")
        load = os.getloadavg()[0]
        out = run_method(name, data, args)
        out["load_avg_1min_before"] = load
        labels = out.pop("labels")
        centroids = out.pop("centroids")
        row = {"method": name, **out}
        row["inertia"] = inertia(data.x, labels, centroids)
        row["n_clusters_used"] = int(len(np.unique(labels)))
        row["nmi"] = nmi(data.y[clustered], labels[clustered])
        if args.k <= MAX_K_FOR_ACC:
            row["accuracy"] = cluster_accuracy(data.y[clustered], labels[clustered])
        rows.append(row)
        console.print(f"  {name}: {row['wall_s']:.2f}s inertia={row['inertia']:.2f}")

    result = {
        "bench": "kmeans",
        "mode": "gpu" if args.gpu else "cpu",
        "machine": machine_info(device),
        "config": {
            "n": args.n,
            "d": args.d,
            "k": args.k,
            "true_k": args.true_k,
            "niter": args.niter,
            "seed": args.seed,
            "noise_frac": args.noise_frac,
            "spread": args.spread,
            "skipped": args.skip,
        },
        "inertia_definition": "sum over all N points of squared L2 distance to the assigned centroid (float64)",
        "timing_note": (
            "wall_s: fit + labelling all points; cpu_s: this process's CPU time over the same span (all threads). "
            "On a shared machine (see load_avg_1min_before) wall_s is inflated by other jobs; cpu_s less so, "
            "though spinning OpenMP threads also count."
        ),
        "results": rows,
    }
    if args.out is not None:
        atomic_write_json(args.out, result)

    table = Table(title=f"K-means N={args.n} D={args.d} K={args.k} niter={args.niter} ({device})")
    for col in ("method", "device", "wall s", "cpu s", "iters", "n_train", "inertia", "vs best", "ACC", "NMI"):
        table.add_column(col, justify="left" if col in ("method", "device") else "right")
    best = min(r["inertia"] for r in rows) if rows else 0.0
    for r in rows:
        acc = r.get("accuracy")
        table.add_row(
            r["method"],
            r["device"],
            f"{r['wall_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            str(r["iterations"]),
            str(r["n_train"]),
            f"{r['inertia']:.2f}",
            f"{r['inertia'] / best - 1:+.2%}" if best else "-",
            "-" if acc is None else f"{acc:.3f}",
            f"{r['nmi']:.3f}",
        )
    console.print(table)
    if args.out is not None:
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
