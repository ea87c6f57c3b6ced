"""`segue shards build`: turn face identity folders (or existing tars) into WebDataset shards.

The build is planned first (which file goes to which split, shard and key) from a deterministic listing, then
shards are written independently through the project's one shard writer (:mod:`segue_dist.data.shard_writer`:
a temporary name renamed into place, the shard's stats written last). Inputs are listed and read by
:mod:`segue_dist.data.sources`.
A rerun re-plans identically, skips shards whose tar and stats both exist and redoes the rest, so an interrupted
build finishes into exactly the shards an uninterrupted one would have made.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segue_dist.config import ConfigError, add_overrides_argument, load_config, save_resolved
from segue_dist.data.images import (
    BadImage,
    decode_image,
    encode_jpeg,
    encode_png,
    resize_center_crop,
    sniff_format,
)
from segue_dist.data.shard_writer import SHARD_FILE, USTAR, ShardFile, stats_path
from segue_dist.data.shard_writer import shard_is_finished as shard_file_is_finished
from segue_dist.data.sources import (
    SPLITS,
    TAR_SEP,
    SourceItem,
    inside,
    list_inputs,
    read_source_bytes,
    same_path,
)
from segue_dist.utils.io import atomic_write_json, read_json, remove_stale_temps
from segue_dist.utils.progress import make_progress, print_table
from segue_dist.utils.seed import derive_seed


@dataclass
class ShardsConfig:
    src: str = ""
    out: str = ""
    min_per_identity: int = 1
    max_per_identity: int = 0  # 0 = no cap
    # Keep only identities with fewer than this many images (0 = no limit). With min_per_identity it selects a band,
    # e.g. the LFW identities *outside* LFW-62 (fewer than 20 images) to train a disjoint feature extractor.
    below_per_identity: int = 0
    test_per_identity: int = 0
    test_fraction: float = 0.0
    size: list[int] = field(default_factory=list)  # [] keep, [s] square, [h, w]
    samples_per_shard: int = 1000
    jpeg_quality: int = 95
    seed: int = 0
    workers: int = 2
    identity_field: str = "identity"  # for tar inputs: json field that names the identity

    def __post_init__(self) -> None:
        if self.min_per_identity < 1:
            raise ValueError(f"min_per_identity must be >= 1, got {self.min_per_identity}")
        if self.max_per_identity and self.max_per_identity < self.min_per_identity:
            raise ValueError(
                f"max_per_identity ({self.max_per_identity}) is below min_per_identity ({self.min_per_identity})"
            )
        if self.below_per_identity and self.below_per_identity <= self.min_per_identity:
            raise ValueError(
                f"below_per_identity ({self.below_per_identity}) must exceed min_per_identity ({self.min_per_identity})"
            )
        if self.test_per_identity < 0:
            raise ValueError(f"test_per_identity must be >= 0, got {self.test_per_identity}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.test_per_identity and self.test_fraction:
            raise ValueError("give test_per_identity or test_fraction, not both")
        if len(self.size) > 2 or any(s < 8 for s in self.size):
            raise ValueError(f"size must be [], [side] or [height, width] with sides >= 8, got {self.size}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def target_size(self) -> tuple[int, int] | None:
        if not self.size:
            return None
        return (self.size[0], self.size[0]) if len(self.size) == 1 else (self.size[0], self.size[1])


@dataclass
class PlannedSample:
    key: str
    label: int
    identity: str
    source: str
    archive: str | None = None
    member: str | None = None
    offset: int = -1
    size: int = -1


# --------------------------------------------------------------------------------------------------------- planning


def plan_build(items: list[SourceItem], cfg: ShardsConfig) -> tuple[dict[str, int], dict[str, list[PlannedSample]]]:
    """Deterministic label map and per-split sample lists (already in shard order)."""
    by_identity: dict[str, list[SourceItem]] = defaultdict(list)
    for item in items:
        by_identity[item.identity].append(item)
    kept = sorted(
        ident
        for ident, group in by_identity.items()
        if len(group) >= cfg.min_per_identity and (not cfg.below_per_identity or len(group) < cfg.below_per_identity)
    )
    labels = {ident: label for label, ident in enumerate(kept)}
    splits: dict[str, list[PlannedSample]] = {s: [] for s in SPLITS}
    for ident in kept:
        group = sorted(by_identity[ident], key=lambda it: (it.archive or it.source, it.member or "", it.source))
        # A per-identity seed: adding or removing one identity never reshuffles the others.
        rng = random.Random(derive_seed(cfg.seed, "split", ident))
        order = list(range(len(group)))
        rng.shuffle(order)
        if cfg.max_per_identity:
            order = order[: cfg.max_per_identity]
        n_test = _n_test(len(order), cfg)
        for rank, idx in enumerate(order):
            item = group[idx]
            split = item.split or ("test" if rank < n_test else "train")
            key = f"{labels[ident]:05d}_{idx:05d}"
            splits[split].append(
                PlannedSample(key, labels[ident], ident, item.source, item.archive, item.member, item.offset, item.size)
            )
    for split, samples in splits.items():
        # Mix identities across shards so any one shard is a fair sample of the set.
        samples.sort(key=lambda s: s.key)
        random.Random(derive_seed(cfg.seed, "order", split)).shuffle(samples)
    return labels, splits


def _n_test(n: int, cfg: ShardsConfig) -> int:
    if cfg.test_per_identity:
        return min(cfg.test_per_identity, n - 1)
    if cfg.test_fraction:
        return min(max(1, round(n * cfg.test_fraction)), n - 1)
    return 0


def chunk(samples: list[PlannedSample], size: int) -> list[list[PlannedSample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


# ---------------------------------------------------------------------------------------------------------- writing


def prepare_image(data: bytes, target: tuple[int, int] | None, jpeg_quality: int) -> tuple[str, bytes, list[int], str]:
    """Validate one image; return (extension, bytes to store, original [w, h], note).

    JPEG and PNG bytes are kept as they are when no resize is asked and the image is plain RGB or grayscale (the
    loader makes grayscale RGB), so no generation loss is added to the faces; anything else is converted once:
    JPEG stays JPEG, every other format becomes lossless PNG. ``note`` says what was converted ("" when nothing
    was, a plain resize is not a conversion), and is what the build counts as ``converted``.
    """
    img = decode_image(data)
    fmt = sniff_format(data)
    try:
        with Image.open(io.BytesIO(data)) as raw:
            mode, kind = raw.mode, raw.format or "unknown"
    except Exception as exc:  # noqa: BLE001 - decode_image already read it; this only re-reads the header
        raise BadImage(f"corrupt image header: {exc}") from None
    orig_size = [img.width, img.height]  # upright (EXIF orientation applied, as every decode in the project does)
    plain = mode in ("RGB", "L")
    if target is None and fmt in ("jpg", "png") and plain:
        return fmt, data, orig_size, ""
    notes = []
    if not plain:
        notes.append(f"converted {mode} to RGB")
    if fmt is None:
        notes.append(f"converted {kind} to PNG")
    if target is not None:
        img = resize_center_crop(img, target)
    arr = np.asarray(img, dtype=np.uint8)
    if fmt == "jpg":
        return "jpg", encode_jpeg(arr, jpeg_quality), orig_size, "; ".join(notes)
    return "png", encode_png(arr, compress_level=6), orig_size, "; ".join(notes)


def write_shard(
    tar_path: Path, samples: list[PlannedSample], cfg: ShardsConfig, src_root: str, plan: str
) -> dict[str, Any]:
    """Write one shard and then its stats (which record ``plan``); returns the stats."""
    stats: dict[str, Any] = {"shard": tar_path.name, "planned": len(samples), "written": 0, "plan": plan}
    skipped, converted = [], []
    shard = ShardFile(tar_path, USTAR)  # USTAR: the format shard builds have always had
    try:
        for sample in samples:
            source = _relative(sample.source, src_root)
            try:
                data = read_source_bytes(
                    sample.source, archive=sample.archive, member=sample.member, offset=sample.offset, size=sample.size
                )
                ext, blob, orig_size, note = prepare_image(data, cfg.target_size, cfg.jpeg_quality)
            except BadImage as exc:
                skipped.append({"key": sample.key, "source": source, "reason": str(exc)})
                continue
            if note:
                converted.append({"key": sample.key, "source": source, "note": note})
            shard.write(
                _sample(sample, ext, blob, {"identity": sample.identity, "source": source, "orig_size": orig_size})
            )
            stats["written"] += 1
    except BaseException:
        shard.abort()
        raise
    stats.update(skipped=len(skipped), converted=len(converted), skipped_samples=skipped, converted_samples=converted)
    shard.finish(stats)
    return stats


def _sample(sample: PlannedSample, ext: str, blob: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "__key__": sample.key,
        ext: blob,
        "cls": str(sample.label).encode(),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def _relative(source: str, root: str) -> str:
    path, sep, member = source.partition(TAR_SEP) if not os.path.isfile(source) else (source, "", "")
    rel = os.path.relpath(path, root) if os.path.isabs(path) == os.path.isabs(root) else path
    return rel + sep + member


def plan_digest(samples: list[PlannedSample], cfg: ShardsConfig, src_root: str) -> str:
    """What a shard must contain: its samples (key, label, identity, source) and the settings that change bytes."""
    blob = json.dumps(
        {
            "size": list(cfg.target_size) if cfg.target_size else None,
            "jpeg_quality": cfg.jpeg_quality,
            "samples": [[s.key, s.label, s.identity, _relative(s.source, src_root)] for s in samples],
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def shard_is_finished(tar_path: Path, plan: str | None = None) -> bool:
    """Tar and stats both on disk (the stats are written last), and, given ``plan``, made from that plan."""
    if not shard_file_is_finished(tar_path):
        return False
    if plan is None:
        return True
    try:
        return read_json(stats_path(tar_path)).get("plan") == plan
    except (OSError, ValueError, AttributeError):
        return False


def _build_one(job: tuple[str, list[PlannedSample], ShardsConfig, str, str]) -> dict[str, Any]:
    tar_path, samples, cfg, src_root, plan = job
    return write_shard(Path(tar_path), samples, cfg, src_root, plan)


def _remove_stale_shards(split_dir: Path, keep: set[str]) -> int:
    """Delete shards (and stats) of an earlier, different build that this plan does not make."""
    removed = 0
    if not split_dir.is_dir():
        return 0
    for path in split_dir.iterdir():
        if SHARD_FILE.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _check_out_is_not_src(src: Path, out: Path) -> None:
    if same_path(src, out) or any(inside(src, out / split) for split in SPLITS):
        raise ValueError(f"--out {out} would overwrite the input {src}; choose another output folder")


def build_shards(cfg: ShardsConfig, show_progress: bool = True) -> dict[str, Any]:
    """Plan and write every shard; return the summary (also written to `<out>/dataset.json`).

    A rerun into the same folder (after an interruption, or with changed settings) redoes exactly the shards whose
    plan differs from what is on disk and removes shards the new plan no longer has.
    """
    src, out = Path(cfg.src), Path(cfg.out)
    _check_out_is_not_src(src, out)
    notes: list[str] = []
    items = list_inputs(src, cfg.identity_field, exclude=out, notes=notes)
    if not items:
        raise ValueError(f"no images found under {src} (expected identity folders, train/test folders or .tar shards)")
    labels, splits = plan_build(items, cfg)
    if not labels:
        raise ValueError(f"no identity under {src} has at least {cfg.min_per_identity} images")
    src_root = str(src.parent if src.is_file() else src)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    save_resolved(cfg, out, "shards_config.yaml")
    jobs, planned = [], {}
    for split in SPLITS:
        samples = splits[split]
        split_dir = out / split
        parts = chunk(samples, cfg.samples_per_shard)
        names = [f"{index:05d}.tar" for index in range(len(parts))]
        remove_stale_temps(split_dir)
        _remove_stale_shards(split_dir, {n for name in names for n in (name, stats_path(Path(name)).name)})
        if not samples:
            for meta in ("sizes.json", "labels.json"):
                (split_dir / meta).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                split_dir.rmdir()
            continue
        planned[split] = names
        split_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(split_dir / "labels.json", {"labels": labels, "num_classes": len(labels)})
        for name, part in zip(names, parts, strict=True):
            tar_path = split_dir / name
            plan = plan_digest(part, cfg, src_root)
            if not shard_is_finished(tar_path, plan):
                jobs.append((str(tar_path), part, cfg, src_root, plan))
    total_jobs = len(jobs)
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task("writing shards", total=total_jobs)
        for _ in _run_jobs(jobs, cfg.workers):
            progress.advance(task)
    below_min = sum(1 for item in items if item.identity not in labels)
    summary = summarise(out, labels, len(items), cfg, planned)
    summary["inputs_below_min"] = below_min
    summary["inputs_over_max"] = len(items) - below_min - summary["planned"]
    summary["input_warnings"] = notes
    atomic_write_json(out / "dataset.json", summary)
    # Not part of dataset.json: that file describes the data, identically however many runs it took to make.
    summary["shards_built_now"] = total_jobs
    return summary


def _run_jobs(jobs: list, workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _build_one(job)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_build_one, jobs)


def summarise(
    out: Path, labels: dict[str, int], n_inputs: int, cfg: ShardsConfig, planned: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """Totals from the per-shard stats (the truth on disk), and `sizes.json` per split."""
    summary: dict[str, Any] = {"identities": len(labels), "inputs_listed": n_inputs, "splits": {}}
    for split in SPLITS:
        split_dir = out / split
        if planned is not None:
            if split not in planned:
                continue
            tar_names = planned[split]
        elif split_dir.is_dir():
            tar_names = sorted(p.name for p in split_dir.glob("*.tar"))
        else:
            continue
        sizes, planned_n, skipped, converted, reasons = {}, 0, 0, 0, []
        for name in tar_names:
            stats = read_json(stats_path(split_dir / name))
            sizes[name] = stats["written"]
            planned_n += stats.get("planned", stats["written"] + stats["skipped"])
            skipped += stats["skipped"]
            converted += stats.get("converted", 0)
            reasons.extend(stats.get("skipped_samples", []))
        atomic_write_json(split_dir / "sizes.json", sizes)
        summary["splits"][split] = {
            "shards": len(sizes),
            "planned": planned_n,
            "samples": sum(sizes.values()),
            "skipped": skipped,
            "converted": converted,
            "skipped_samples": reasons,
        }
    for total in ("planned", "samples", "skipped", "converted"):
        summary[total] = sum(s[total] for s in summary["splits"].values())
    summary["size"] = list(cfg.target_size) if cfg.target_size else None
    return summary


def print_summary(summary: dict[str, Any], out: str) -> None:
    rows = []
    for split, info in summary["splits"].items():
        rows.append([split, str(info["shards"]), str(info["samples"]), str(info["skipped"]), str(info["converted"])])
    rows.append(["total", "", str(summary["samples"]), str(summary["skipped"]), str(summary.get("converted", ""))])
    print_table(
        f"shards: {out} — {summary['identities']} identities",
        ["split", "shards", "samples", "skipped", "converted"],
        rows,
    )
    for split, info in summary["splits"].items():
        for item in info["skipped_samples"][:10]:
            print(f"  skipped [{split}] {item['source']}: {item['reason']}")
        if len(info["skipped_samples"]) > 10:
            print(f"  ... and {len(info['skipped_samples']) - 10} more skipped in {split} (see the _stats.json files)")
    for note in summary.get("input_warnings", []):
        print(f"  warning: {note}")


# -------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["build"], help="what to do with shards")
    parser.add_argument("--config", help="YAML with ShardsConfig fields")
    parser.add_argument("--src", help="identity folders, a train/ test/ ImageFolder tree, or WebDataset tars")
    parser.add_argument("--out", help="output folder, e.g. shards/lfw62")
    parser.add_argument("--min-per-identity", type=int)
    parser.add_argument("--max-per-identity", type=int)
    parser.add_argument("--below-per-identity", type=int, help="keep identities with fewer images than this")
    parser.add_argument("--test-per-identity", type=int)
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--size", type=str, help="side or HxW, e.g. 64 or 112x96")
    parser.add_argument("--samples-per-shard", type=int)
    parser.add_argument("--jpeg-quality", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--identity-field", type=str)
    add_overrides_argument(parser)


def config_from_args(args: argparse.Namespace) -> ShardsConfig:
    overrides = list(args.overrides)
    for name in ShardsConfig.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "size":
            value = (
                "[" + ",".join(str(_side(v, args.size)) for v in str(value).lower().replace("×", "x").split("x")) + "]"
            )
        elif isinstance(value, str):
            # A path is a string whatever it looks like to YAML ("yes", "null", "a: b", "#x", "[1]"): quote it.
            value = json.dumps(value, ensure_ascii=False)
        overrides.append(f"{name}={value}")
    cfg = load_config(ShardsConfig, args.config, overrides)
    if not cfg.src or not cfg.out:
        raise ConfigError("shards build needs --src and --out")
    return cfg


def _side(text: str, given: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"--size {given!r}: expected a side or HxW, e.g. 64 or 112x96") from None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = build_shards(cfg)
    print_summary(summary, cfg.out)
    return 0
