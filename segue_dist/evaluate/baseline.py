"""`segue evaluate baseline`: a UE / LSP / random-noise protected copy of a training split, laid out like `segue
protect` output (same shard names, keys, order, ``.cls`` and ``.json``; PNG, lossless), with ε checked on the
written files by the same quantisation and bound as protect (:mod:`segue_dist.protect.quantise`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor

from segue_dist.config import to_dict
from segue_dist.data.images import encode_png
from segue_dist.data.loader import OnePassStream, Record, one_pass_loader, open_shard_set
from segue_dist.data.shard_writer import PAX, write_shard
from segue_dist.evaluate.config import BASELINE_METHODS, BaselineConfig
from segue_dist.evaluate.data import ImageSet, load_image_set
from segue_dist.protect.quantise import eps_levels, quantise_protected
from segue_dist.utils.device import resolve_device
from segue_dist.utils.io import atomic_write_json, remove_stale_temps
from segue_dist.utils.progress import console, make_progress
from segue_dist.utils.seed import seed_everything

BASELINE_STATS = "baseline.json"


def _write_split(out_dir: Path, data: ImageSet, protected: Tensor, stats_extra: dict[str, Any]) -> dict[str, int]:
    """Write protected (N, 3, H, W) uint8 images with the input's shard names, keys, order, .cls and .json (PNG:
    lossless). Returns ``sizes.json``'s content: shard name -> samples."""
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(data.shards):
        by_shard.setdefault(shard, []).append(i)
    sizes: dict[str, int] = {}
    for shard in sorted(by_shard):
        members = sorted(by_shard[shard], key=lambda i: data.positions[i])
        samples = (
            {"__key__": data.keys[i], "png": encode_png(protected[i].permute(1, 2, 0).numpy()), **data.extras[i]}
            for i in members
        )
        stats = {"shard": shard, "written": len(members), "skipped": 0, **stats_extra}
        # PAX: the tar format baselines have always been written in (webdataset's TarWriter).
        write_shard(out_dir / shard, samples, stats, PAX)
        sizes[shard] = len(members)
    return sizes


def verify_written(out_dir: str | Path, clean: ImageSet, eps: float, workers: int = 2) -> dict[str, float]:
    """Re-read the written shards and check |protected - clean| <= eps_levels(eps) on the uint8 pixels, key by key.

    Returns ``{"linf_255", "eps_255", "mae_255"}`` in uint8 levels; raises ``ValueError`` on a missing, unreadable
    or extra sample, or a pixel past the bound."""
    limit = eps_levels(eps)
    index = {k: i for i, k in enumerate(clean.keys)}
    worst, total, count = 0, 0.0, 0
    for record in one_pass_loader(OnePassStream(list(open_shard_set(out_dir).shards)), workers):
        if not isinstance(record, Record):
            continue
        if record.image is None or record.key not in index:
            raise ValueError(f"{out_dir}: written sample {record.key} is unreadable or has no clean counterpart")
        diff = (record.image.int() - clean.images[index[record.key]].int()).abs()
        worst = max(worst, int(diff.max()))
        total += float(diff.float().mean())
        count += 1
    if count != len(clean.keys):
        raise ValueError(f"{out_dir}: {count} samples written, expected {len(clean.keys)}")
    if worst > limit:
        raise ValueError(f"{out_dir}: a pixel moved by {worst}/255, above eps = {limit}/255")
    return {"linf_255": worst, "eps_255": limit, "mae_255": total / max(1, count)}


def write_baseline(cfg: BaselineConfig, show_progress: bool = True) -> dict[str, Any]:
    """Baseline-protect a training split into a shard set laid out like `segue protect` output; returns the stats."""
    from segue_dist.baselines import make_baseline_perturbations
    from segue_dist.models.classifiers import build_classifier

    start = time.perf_counter()
    device = resolve_device(cfg.device)
    in_dir, out_dir = Path(cfg.in_dir), Path(cfg.out_dir)
    if in_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out must differ from --in ({in_dir})")
    data = load_image_set(in_dir, cfg.size, keep_meta=True)
    library_method, options = BASELINE_METHODS[cfg.method]
    options = {**options, **cfg.options}
    size = (int(data.images.shape[-2]), int(data.images.shape[-1]))
    k = data.num_classes
    if library_method == "ue":
        options.setdefault("device", device)
    factory = (
        (lambda: build_classifier(cfg.surrogate, k, size, small_stem=cfg.surrogate_small_stem))
        if library_method in ("ue", "tap")
        else None
    )
    console.print(
        f"[bold]baseline {cfg.method}[/]: {len(data.keys)} images {size[0]}x{size[1]}, {k} classes, eps {cfg.eps * 255:.2f}/255"
    )
    seed_everything(cfg.seed)
    gen_start = time.perf_counter()
    with make_progress(disable=not show_progress) as progress:
        # The total is the image count, so the finished bar reads "n/n" and not "0/?".
        task = progress.add_task(f"generating {cfg.method}", total=len(data.keys))
        if library_method == "ue":
            options.setdefault(
                "progress_callback", lambda rnd, acc: progress.update(task, info=f"round {rnd} surrogate acc {acc:.3f}")
            )
        delta = make_baseline_perturbations(
            library_method,
            data.images.float().div(255),
            data.labels,
            k,
            eps=cfg.eps,
            seed=cfg.seed,
            model_factory=factory,
            keys=data.keys,
            **options,
        )
        progress.update(task, completed=len(data.keys))
    generation_s = time.perf_counter() - gen_start
    # The integer clamp makes the bound exact at any ε, k/255 or not (e.g. 0.03 = 7.65 levels -> 7).
    protected = quantise_protected(data.images, delta.cpu(), eps_levels(cfg.eps))
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    shard_stats = {"method": cfg.method, "eps": cfg.eps}
    sizes = _write_split(out_dir, data, protected, shard_stats)
    atomic_write_json(out_dir / "labels.json", {"labels": data.label_map, "num_classes": len(data.label_map)})
    atomic_write_json(out_dir / "sizes.json", sizes)
    check = verify_written(out_dir, data, cfg.eps)
    stats = {
        "kind": "baseline",
        "method": cfg.method,
        "in": str(in_dir),
        "out": str(out_dir),
        "samples": len(data.keys),
        "skipped": data.skipped,
        "image_size": list(size),
        "num_classes": k,
        "generation_s": round(generation_s, 3),
        "total_s": round(time.perf_counter() - start, 3),
        "device": str(device),
        "check": check,
        "config": to_dict(cfg),
    }
    atomic_write_json(out_dir / BASELINE_STATS, stats)
    return stats


def baseline_is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / BASELINE_STATS).is_file() and (Path(out_dir) / "sizes.json").is_file()
