"""`segue cluster`: pseudo-labels for unlabelled faces (features -> K-means -> sidecar -> quality table).

    segue cluster --shards shards/lfw62/train --k 62 --extractor runs/extractor --out shards/lfw62/pseudo
    torchrun --nproc_per_node 8 -m segue_dist.cluster --shards ... --k ... --extractor ... --out ...

Sub-steps run on their own too: `fit-extractor` (train a face embedding model on a labelled shard set whose
identities are disjoint from the target), `features` (one embedding file per shard; each rank takes its own
shards; a rerun skips finished shards), `kmeans` (FAISS on CPU/GPU, or torch Lloyd across ranks with
torch.distributed; every sample gets a label) and `quality` (clustering accuracy / NMI / ARI / purity against
true labels where the shards have them; Segue needs accuracy above the paper's threshold, 0.8).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from segue_dist.config import ConfigError
from segue_dist.data.assign import contiguous_split
from segue_dist.data.loader import (
    OnePassStream,
    Record,
    TrainStream,
    assign_shards,
    batches_per_epoch_for,
    iter_batches,
    one_pass_loader,
    open_shard_set,
    train_loader,
)
from segue_dist.data.sidecar import write_sidecar
from segue_dist.kmeans import KMeansConfig, estimate_k, fit_kmeans, fit_kmeans_distributed, overcluster_k
from segue_dist.metrics.clustering import SEGUE_ACCURACY_THRESHOLD, clustering_report
from segue_dist.models.embedding import CosineMarginHead, EmbedderConfig, FaceEmbedder
from segue_dist.models.face_dlib import INSTALL_HINT, DlibFeatures, FaceModelUnavailable, dlib_available, weights_sha256
from segue_dist.models.third_party import TorchvisionFeatures, third_party_backbone
from segue_dist.supervised import supervised_epoch
from segue_dist.utils import dist as dist_utils
from segue_dist.utils.io import atomic_write_json, read_json, remove_stale_temps
from segue_dist.utils.progress import console, make_progress, print_table
from segue_dist.utils.seed import seed_everything
from segue_dist.weights import file_sha256, load_state_strict, save_safetensors

EXTRACTOR_FORMAT = "segue-extractor/1"
DLIB = "dlib"  # --extractor value of the pretrained dlib face descriptor (segue_dist/models/face_dlib.py)

# ------------------------------------------------------------------------------------------- feature extractor


@dataclass
class ExtractorTrainConfig:
    shards: str
    out: str
    arch: str = "resnet18"
    embed_dim: int = 128
    image_size: int = 64
    small_stem: bool | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    margin: float = 0.25
    scale: float = 30.0
    seed: int = 0
    num_workers: int = 2


def fit_extractor(cfg: ExtractorTrainConfig, show_progress: bool = True) -> Path:
    """Train a FaceEmbedder with a CosFace head on labelled shards; export safetensors + JSON; return the path."""
    seed_everything(cfg.seed)
    device = dist_utils.best_device()
    shard_set = open_shard_set(cfg.shards)
    if not shard_set.labels:
        raise ConfigError(f"{cfg.shards} has no labels.json: the extractor trains on labelled identities")
    model = FaceEmbedder(EmbedderConfig(cfg.arch, cfg.embed_dim, cfg.image_size, cfg.small_stem)).to(device)
    head = CosineMarginHead(cfg.embed_dim, shard_set.num_classes, cfg.scale, cfg.margin).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = batches_per_epoch_for(shard_set.num_samples, 1, cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * batches)
    stream = TrainStream(
        shard_set, batch_size=cfg.batch_size, batches_per_epoch=batches, seed=cfg.seed, image_size=cfg.image_size
    )
    flip = torch.Generator().manual_seed(cfg.seed)
    history = []
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task("fit extractor", total=cfg.epochs * batches)
        for epoch in range(1, cfg.epochs + 1):
            stream.set_epoch(epoch)
            model.train()
            stats = supervised_epoch(
                _mirrored_batches(train_loader(stream, cfg.num_workers), flip, device),
                lambda x, y: head(model(x), y),
                optimizer,
                scheduler,
                lambda loss, e=epoch: progress.update(task, advance=1, info=f"epoch {e} loss {loss:.3f}"),
            )
            history.append({"epoch": epoch, "loss": stats.mean_loss, "train_accuracy": stats.accuracy})
    return export_extractor(model, cfg, shard_set.num_classes, history)


def _mirrored_batches(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, int]], flip: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x in [0, 1], labels) on ``device``, half the faces mirrored (faces are left-right symmetric: a free
    augmentation)."""
    for images, labels, _ in loader:
        x = images.to(device).float().div_(255.0)
        mirror = torch.rand(x.shape[0], generator=flip) < 0.5
        x[mirror] = x[mirror].flip(-1)
        yield x, labels.to(device)


def export_extractor(model: FaceEmbedder, cfg: ExtractorTrainConfig, identities: int, history: list) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "extractor.safetensors"
    save_safetensors(model.state_dict(), weights, metadata={"format": EXTRACTOR_FORMAT})
    atomic_write_json(
        out / "extractor.json",
        {
            "format": EXTRACTOR_FORMAT,
            "embedder": asdict(model.config),
            "trained_on": cfg.shards,
            "identities": identities,
            "train_config": asdict(cfg),
            "history": history,
            "weights_sha256": file_sha256(weights),
        },
    )
    return weights


def load_feature_model(path: str, arch: str = "", image_size: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """``dlib`` (the pretrained face descriptor of the [faces] extra), an exported extractor folder/file, or
    ``arch`` = ``torchvision:<name>`` / ``timm:<name>`` with local weights."""
    if path == DLIB:
        try:
            # image_size 0: dlib sees the stored pixels (it detects and aligns the face itself).
            return DlibFeatures().eval(), {"extractor": DLIB, "sha256": weights_sha256(), "image_size": 0}
        except FaceModelUnavailable as exc:
            raise ConfigError(str(exc)) from None
    weights = Path(path)
    if weights.is_dir():
        weights = weights / "extractor.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"feature model weights not found: {weights}")
    if not arch:
        meta = read_json(weights.with_suffix(".json"))
        if meta.get("format") != EXTRACTOR_FORMAT:
            raise ConfigError(f"{weights.with_suffix('.json')}: not a segue extractor; give --extractor-arch")
        model = FaceEmbedder(EmbedderConfig(**meta["embedder"]))
        load_state_strict(model, load_file(str(weights)), str(weights))
        return model.eval(), {**meta, "sha256": file_sha256(weights)}
    backbone = third_party_backbone(arch, weights)
    size = image_size or 112
    return TorchvisionFeatures(backbone, size).eval(), {
        "arch": arch,
        "sha256": file_sha256(weights),
        "image_size": size,
    }


# ------------------------------------------------------------------------------------------------------ features


def feature_paths(out: Path, shard: str) -> tuple[Path, Path]:
    stem = Path(shard).stem
    return out / "features" / f"{stem}.safetensors", out / "features" / f"{stem}.json"


def extract_features(
    shards_dir: str,
    model: nn.Module,
    out: Path,
    *,
    image_size: int | None,
    batch_size: int = 256,
    num_workers: int = 2,
    show_progress: bool = True,
) -> dict[str, int]:
    """Embed this rank's shards; one safetensors + JSON per shard (JSON last = finished). Returns counts.

    ``image_size`` None feeds the stored size. A model with ``counts`` (dlib: faces found / fallbacks) adds them.
    """
    rank, world = dist_utils.rank(), dist_utils.world_size()
    device = dist_utils.best_device()
    model = model.to(device).eval()
    shard_set = open_shard_set(shards_dir)
    (out / "features").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        remove_stale_temps(out / "features")
    mine = assign_shards(shard_set.shards, rank, world)
    todo = [s for s in mine if not feature_paths(out, s)[1].is_file()]
    pending: dict[str, dict[str, list]] = {s: {"keys": [], "labels": [], "emb": [], "bad": []} for s in todo}
    counts = {"shards_done_before": len(mine) - len(todo), "samples": 0, "skipped": 0}
    if not todo:
        return counts
    loader = one_pass_loader(OnePassStream(todo, image_size=image_size), num_workers)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    total = sum(shard_set.sizes[Path(s).name] for s in todo)
    with make_progress(disable=not (show_progress and rank == 0)) as progress:
        task = progress.add_task("features", total=total)
        for good, bad, ends in iter_batches(iter(loader), batch_size):
            if good:
                x = torch.stack([r.image for r in good]).to(device).float().div_(255.0)
                with torch.no_grad(), autocast:
                    emb = model(x).float().cpu()
                for record, row in zip(good, emb, strict=True):
                    _collect(pending[record.shard], record, row)
            for record in bad:
                pending[record.shard]["bad"].append({"key": record.key, "reason": record.error})
            for end in ends:
                counts["samples"] += len(pending[end.shard]["keys"])
                counts["skipped"] += len(pending[end.shard]["bad"])
                _write_shard_features(out, end.shard, pending.pop(end.shard))
            progress.update(task, advance=len(good) + len(bad))
    return {**counts, **getattr(model, "counts", {})}


def _collect(bucket: dict[str, list], record: Record, row: torch.Tensor) -> None:
    bucket["keys"].append(record.key)
    bucket["labels"].append(record.label)
    bucket["emb"].append(row)


def _write_shard_features(out: Path, shard: str, bucket: dict[str, list]) -> None:
    weights, meta = feature_paths(out, shard)
    dim = bucket["emb"][0].numel() if bucket["emb"] else 0
    emb = torch.stack(bucket["emb"]) if bucket["emb"] else torch.zeros(0, dim)
    save_safetensors({"embeddings": emb}, weights)
    atomic_write_json(
        meta,
        {"shard": Path(shard).name, "keys": bucket["keys"], "labels": bucket["labels"], "skipped": bucket["bad"]},
    )


def load_features(out: Path, shard_names: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(embeddings (N, D), keys, true labels or -1) for the named shards, in that order."""
    embs, keys, labels = [], [], []
    for name in shard_names:
        weights, meta_path = feature_paths(out, name)
        if not meta_path.is_file():
            raise FileNotFoundError(f"features missing for shard {name} ({meta_path}); run `segue cluster features`")
        meta = read_json(meta_path)
        embs.append(load_file(str(weights))["embeddings"].numpy())
        keys.extend(meta["keys"])
        labels.extend(meta["labels"])
    dim = next((e.shape[1] for e in embs if e.size), 0)
    x = np.concatenate([e.reshape(-1, dim) for e in embs]) if embs else np.zeros((0, dim), np.float32)
    return x.astype(np.float32), keys, np.asarray(labels, dtype=np.int64)


# -------------------------------------------------------------------------------------------------------- k-means


def run_kmeans(out: Path, shards_dir: str, cfg: KMeansConfig) -> tuple[list[str], np.ndarray, np.ndarray, Any]:
    """Cluster all features. Returns (keys, pseudo-labels, true labels, result), complete on rank 0."""
    names = sorted(Path(s).name for s in open_shard_set(shards_dir).shards)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if world > 1 and dist.is_initialized():
        x, keys, truth = load_features(out, contiguous_split(names, rank, world))
        result = fit_kmeans_distributed(x, cfg)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (keys, result.labels.tolist(), truth.tolist()))
        keys = [k for part in gathered for k in part[0]]
        labels = np.asarray([v for part in gathered for v in part[1]], dtype=np.int64)
        truth = np.asarray([v for part in gathered for v in part[2]], dtype=np.int64)
        return keys, labels, truth, result
    x, keys, truth = load_features(out, names)
    if cfg.k > len(x):
        raise ValueError(f"k={cfg.k} exceeds the number of samples with features ({len(x)})")
    result = fit_kmeans(x, cfg)
    return keys, result.labels.astype(np.int64), truth, result


def quality_rows(report: dict[str, Any]) -> list[list[str]]:
    verdict = "yes" if report["meets_segue_threshold"] else "NO: pseudo-labels too noisy for Segue"
    return [
        ["clustering accuracy (Hungarian)", f"{report['accuracy']:.1%}"],
        [f"> {SEGUE_ACCURACY_THRESHOLD:.0%} (Segue's condition)", verdict],
        ["NMI", f"{report['nmi']:.3f}"],
        ["ARI", f"{report['ari']:.3f}"],
        ["purity", f"{report['purity']:.1%}"],
        ["clusters / identities / samples", f"{report['n_clusters']} / {report['n_classes']} / {report['n_samples']}"],
    ]


# ---------------------------------------------------------------------------------------------------------- driver


def cluster(args: argparse.Namespace) -> dict[str, Any]:
    """Features -> K-means -> sidecar -> quality, resumable and distributed."""
    out = Path(args.out)
    rank = dist_utils.rank()
    seed_everything(args.seed)
    model, model_meta = load_feature_model(default_extractor(args.extractor), args.extractor_arch, args.size)
    image_size = args.size or int(model_meta.get("embedder", {}).get("image_size", 0) or model_meta["image_size"])
    t0 = time.perf_counter()
    counts = extract_features(
        args.shards, model, out, image_size=image_size or None, batch_size=args.batch_size, num_workers=args.workers
    )
    counts = sum_over_ranks(counts)  # also a barrier: every rank's features are on disk after it
    t_features = time.perf_counter() - t0
    k = choose_k(args, out)
    kcfg = KMeansConfig(k=k, niter=args.niter, seed=args.seed, backend=args.backend)
    t1 = time.perf_counter()
    keys, labels, truth, result = run_kmeans(out, args.shards, kcfg)
    t_kmeans = time.perf_counter() - t1
    summary: dict[str, Any] = {
        "k": k,
        "samples_labelled": len(keys),
        "features": counts,
        "backend": result.backend,
        "device": result.device,
        "world_size": dist_utils.world_size(),
        "seconds": {"features": t_features, "kmeans": t_kmeans},
        "feature_model_sha256": model_meta["sha256"],
    }
    if rank == 0:
        label_map = dict(zip(keys, labels.tolist(), strict=True))
        write_sidecar(
            out / "pseudo_labels.json",
            label_map,
            k,
            feature_model_sha256=model_meta["sha256"],
            extra={"shards": str(args.shards), "kmeans": {"backend": result.backend, "inertia": float(result.inertia)}},
        )
        save_safetensors(
            {"centroids": torch.from_numpy(np.ascontiguousarray(result.centroids))}, out / "centroids.safetensors"
        )
        if (truth >= 0).all() and len(truth):
            summary["quality"] = clustering_report(truth, labels)
            print_table("pseudo-label quality", ["metric", "value"], quality_rows(summary["quality"]))
        atomic_write_json(out / "cluster_summary.json", summary)
        console.print(f"labelled {len(keys)} samples into {k} clusters -> {out / 'pseudo_labels.json'}")
    return summary


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Per-rank feature counts (samples, skipped, faces found, fallbacks) summed, so the summary covers all ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    gathered: list[Any] = [None] * dist_utils.world_size()
    dist.all_gather_object(gathered, counts)
    return {key: sum(int(part.get(key, 0)) for part in gathered) for key in counts}


def default_extractor(extractor: str) -> str:
    """No --extractor: the pretrained dlib descriptor when the [faces] extra is installed, else a one-line error."""
    if extractor:
        return extractor
    if not dlib_available():
        raise ConfigError(f"--extractor is required: train one with `segue cluster fit-extractor`, or {INSTALL_HINT}")
    return DLIB


def choose_k(args: argparse.Namespace, out: Path) -> int:
    if args.k and not args.estimate_k:
        return overcluster_k(args.k, args.overcluster) if args.overcluster > 1 else args.k
    if not args.estimate_k:
        raise ConfigError("give --k (the number of identities) or --estimate-k MIN:MAX")
    lo, _, hi = args.estimate_k.partition(":")
    names = sorted(Path(s).name for s in open_shard_set(args.shards).shards)
    x, _, _ = load_features(out, names)
    step = max(1, (int(hi) - int(lo)) // 10)
    estimate = estimate_k(x, list(range(int(lo), int(hi) + 1, step)), seed=args.seed)
    console.print(f"estimated K = {estimate.k} (silhouette over {len(estimate.scores)} candidates)")
    return overcluster_k(estimate.k, args.overcluster) if args.overcluster > 1 else estimate.k


# ------------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "fit-extractor"],
        help="run = features + K-means + sidecar + quality",
    )
    parser.add_argument("--shards", required=True, help="split folder to label (or, for fit-extractor, a labelled one)")
    parser.add_argument("--out", required=True, help="output folder (features/, pseudo_labels.json, quality)")
    parser.add_argument("--k", type=int, default=0, help="number of identities K")
    parser.add_argument("--overcluster", type=float, default=1.0, help="use m*K clusters (m >= 1) for an uncertain K")
    parser.add_argument("--estimate-k", default="", help="MIN:MAX: pick K by silhouette when K is unknown")
    parser.add_argument(
        "--extractor",
        default="",
        help="dlib (pretrained face descriptor, the default when the [faces] extra is installed), an exported "
        "extractor folder, or a local weights file",
    )
    parser.add_argument("--extractor-arch", default="", help="torchvision:<name> or timm:<name> for a third-party file")
    parser.add_argument("--size", type=int, default=0, help="input size for the feature model (default: its own)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--niter", type=int, default=25)
    parser.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10, help="fit-extractor: epochs")
    parser.add_argument("--arch", default="resnet18", help="fit-extractor: backbone")
    parser.add_argument("--embed-dim", type=int, default=128, help="fit-extractor: embedding size")
    parser.add_argument(
        "--small-stem", default="auto", choices=["auto", "on", "off"], help="fit-extractor: small-image stem"
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "fit-extractor":
        cfg = ExtractorTrainConfig(
            shards=args.shards,
            out=args.out,
            arch=args.arch,
            embed_dim=args.embed_dim,
            image_size=args.size or 64,
            epochs=args.epochs,
            small_stem=None if args.small_stem == "auto" else args.small_stem == "on",
            seed=args.seed,
            num_workers=args.workers,
        )
        weights = fit_extractor(cfg)
        meta = read_json(weights.with_suffix(".json"))
        last = meta["history"][-1]
        console.print(
            f"extractor: {weights} (train accuracy {last['train_accuracy']:.1%} over {meta['identities']} identities)"
        )
        return 0
    dist_utils.init_if_launched()
    try:
        cluster(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from segue_dist.cli import stage_main

    return stage_main("cluster", argv)


if __name__ == "__main__":
    sys.exit(main())
