"""`segue shards build`: turn face identity folders (or existing tars) into WebDataset shards.

The build is planned first (which file goes to which split, shard and key) from a deterministic listing, then
shards are written independently, each under a temporary name and renamed, with its `_stats.json` written last.
A rerun re-plans identically, skips shards whose tar and stats both exist and redoes the rest, so an interrupted
build finishes into exactly the shards an uninterrupted one would have made.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tarfile
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from segue_dist.config import ConfigError, load_config, save_resolved
from segue_dist.data.images import (
    IMAGE_EXTENSIONS,
    BadImage,
    decode_image,
    encode_jpeg,
    encode_png,
    resize_center_crop,
    sniff_format,
)
from segue_dist.utils.io import atomic_open, atomic_write_json, read_json, remove_stale_temps
from segue_dist.utils.progress import make_progress, print_table
from segue_dist.utils.seed import derive_seed

SPLITS = ("train", "test")
# Fixed tar member mtime: identical inputs must give byte-identical shards, whenever they are built.
TAR_MTIME = 0.0


@dataclass
class ShardsConfig:
    src: str = ""
    out: str = ""
    min_per_identity: int = 1
    max_per_identity: int = 0  # 0 = no cap
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


@dataclass(frozen=True)
class SourceItem:
    """One input image: where its bytes are and whose face it is."""

    identity: str
    source: str  # a file path, or "<tar path>::<member name>"
    split: str | None = None  # set when the input layout already fixes the split


@dataclass
class PlannedSample:
    key: str
    label: int
    identity: str
    source: str


# --------------------------------------------------------------------------------------------------- listing inputs


def _nfc(name: str) -> str:
    # macOS writes decomposed unicode names; normalise so "José" is one identity whatever the filesystem.
    return unicodedata.normalize("NFC", name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_identity_folders(src: Path, split: str | None = None) -> list[SourceItem]:
    items = []
    for ident_dir in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in _image_files(ident_dir):
            items.append(SourceItem(_nfc(ident_dir.name), str(path), split))
    return items


def list_tar_inputs(src: Path, identity_field: str) -> list[SourceItem]:
    """img2dataset-style tars: identity from `.cls`, else the JSON field, else the `.txt` caption."""
    tars = [src] if src.is_file() else sorted(src.rglob("*.tar"))
    items = []
    for tar_path in tars:
        groups: dict[str, dict[str, Any]] = defaultdict(dict)
        with tarfile.open(tar_path) as tf:
            for member in tf:
                if not member.isfile() or "." not in Path(member.name).name:
                    continue
                stem, ext = _split_key(member.name)
                ext = ext.lower()
                if ext in ("jpg", "jpeg", "png", "webp"):
                    groups[stem]["image"] = member.name
                elif ext in ("cls", "json", "txt"):
                    raw = tf.extractfile(member)
                    groups[stem][ext] = raw.read().decode("utf-8", "replace") if raw else ""
        for stem in sorted(groups):
            group = groups[stem]
            if "image" not in group:
                continue
            identity = _identity_from_tar_sample(group, identity_field)
            if identity is None:
                continue
            split = next((s for s in SPLITS if f"/{s}/" in f"/{tar_path.relative_to(src.parent)}"), None)
            items.append(SourceItem(_nfc(identity), f"{tar_path}::{group['image']}", split))
    return items


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything up to the first dot of the basename.
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.rsplit(".", 1)[-1]


def _identity_from_tar_sample(group: dict[str, Any], identity_field: str) -> str | None:
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            if isinstance(meta, dict) and meta.get(identity_field) not in (None, ""):
                return str(meta[identity_field])
        except json.JSONDecodeError:
            pass
    if "cls" in group and group["cls"].strip():
        return group["cls"].strip()
    if "txt" in group and group["txt"].strip():
        return group["txt"].strip()
    return None


def list_inputs(src: Path, identity_field: str = "identity") -> list[SourceItem]:
    """Detect the input layout: tars, an ImageFolder tree with train/ and test/, or identity folders."""
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    if src.is_file() or any(src.rglob("*.tar")):
        return list_tar_inputs(src, identity_field)
    if (src / "train").is_dir() and all(p.name in SPLITS for p in src.iterdir() if p.is_dir()):
        items = []
        for split in SPLITS:
            if (src / split).is_dir():
                items.extend(list_identity_folders(src / split, split))
        return items
    return list_identity_folders(src)


# --------------------------------------------------------------------------------------------------------- planning


def plan_build(items: list[SourceItem], cfg: ShardsConfig) -> tuple[dict[str, int], dict[str, list[PlannedSample]]]:
    """Deterministic label map and per-split sample lists (already in shard order)."""
    by_identity: dict[str, list[SourceItem]] = defaultdict(list)
    for item in items:
        by_identity[item.identity].append(item)
    kept = sorted(ident for ident, group in by_identity.items() if len(group) >= cfg.min_per_identity)
    labels = {ident: label for label, ident in enumerate(kept)}
    splits: dict[str, list[PlannedSample]] = {s: [] for s in SPLITS}
    for ident in kept:
        group = sorted(by_identity[ident], key=lambda it: it.source)
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
            splits[split].append(PlannedSample(key, labels[ident], ident, item.source))
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


def read_source_bytes(source: str) -> bytes:
    if "::" in source:
        tar_path, member = source.split("::", 1)
        with tarfile.open(tar_path) as tf:
            fh = tf.extractfile(member)
            if fh is None:
                raise BadImage(f"tar member is not a file: {member}")
            return fh.read()
    with open(source, "rb") as fh:
        return fh.read()


def prepare_image(data: bytes, target: tuple[int, int] | None, jpeg_quality: int) -> tuple[str, bytes, list[int], str]:
    """Validate one image; return (extension, bytes to store, original [w, h], note).

    JPEG and PNG bytes are kept as they are when no resize is asked and the image is plain RGB or grayscale,
    so no generation loss is added to the faces; anything else is converted once, losslessly where possible.
    """
    img = decode_image(data)
    with Image.open(io.BytesIO(data)) as raw:
        mode = raw.mode
    fmt = sniff_format(data)
    orig_size = [img.width, img.height]
    if target is None and fmt in ("jpg", "png") and mode in ("RGB", "L"):
        return fmt, data, orig_size, ""
    if target is not None:
        img = resize_center_crop(img, target)
    arr = np.asarray(img, dtype=np.uint8)
    if fmt == "jpg":
        note = "" if target is not None else f"converted {mode} to RGB"
        return "jpg", encode_jpeg(arr, jpeg_quality), orig_size, note
    note = "" if target is not None or mode in ("RGB", "L") else f"converted {mode} to RGB"
    return "png", encode_png(arr, compress_level=6), orig_size, note


def write_shard(tar_path: Path, samples: list[PlannedSample], cfg: ShardsConfig, src_root: str) -> dict[str, Any]:
    """Write one shard atomically and return its stats (the caller writes them last)."""
    stats: dict[str, Any] = {"shard": tar_path.name, "planned": len(samples), "written": 0, "skipped": 0}
    skipped, converted = [], 0
    with atomic_open(tar_path, "wb") as fh:
        sink = wds.TarWriter(fh, mtime=TAR_MTIME, encoder=False)
        for sample in samples:
            try:
                ext, blob, orig_size, note = prepare_image(read_source_bytes(sample.source), cfg.target_size, cfg.jpeg_quality)
            except (BadImage, OSError) as exc:
                skipped.append({"key": sample.key, "source": _relative(sample.source, src_root), "reason": str(exc)})
                continue
            converted += bool(note)
            meta = {"identity": sample.identity, "source": _relative(sample.source, src_root), "orig_size": orig_size}
            sink.write(
                {
                    "__key__": sample.key,
                    ext: blob,
                    "cls": str(sample.label).encode(),
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                }
            )
            stats["written"] += 1
        sink.close()
    stats.update(skipped=len(skipped), converted=converted, skipped_samples=skipped)
    return stats


def _relative(source: str, root: str) -> str:
    path = source.split("::", 1)[0]
    rel = os.path.relpath(path, root) if os.path.isabs(path) == os.path.isabs(root) else path
    return rel + ("::" + source.split("::", 1)[1] if "::" in source else "")


def stats_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name.replace(".tar", "._stats.json"))


def shard_is_finished(tar_path: Path) -> bool:
    return tar_path.is_file() and stats_path(tar_path).is_file()


def _build_one(job: tuple[str, list[PlannedSample], ShardsConfig, str]) -> dict[str, Any]:
    tar_path, samples, cfg, src_root = job
    stats = write_shard(Path(tar_path), samples, cfg, src_root)
    atomic_write_json(stats_path(Path(tar_path)), stats)
    return stats


def build_shards(cfg: ShardsConfig, show_progress: bool = True) -> dict[str, Any]:
    """Plan and write every shard; return the summary (also written to `<out>/dataset.json`)."""
    src, out = Path(cfg.src), Path(cfg.out)
    items = list_inputs(src, cfg.identity_field)
    if not items:
        raise ValueError(f"no images found under {src} (expected identity folders, train/test folders or .tar shards)")
    labels, splits = plan_build(items, cfg)
    if not labels:
        raise ValueError(f"no identity under {src} has at least {cfg.min_per_identity} images")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out, "shards_config.yaml")
    jobs = []
    for split, samples in splits.items():
        if not samples:
            continue
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(split_dir)
        atomic_write_json(split_dir / "labels.json", {"labels": labels, "num_classes": len(labels)})
        for index, part in enumerate(chunk(samples, cfg.samples_per_shard)):
            tar_path = split_dir / f"{index:05d}.tar"
            if not shard_is_finished(tar_path):
                jobs.append((str(tar_path), part, cfg, str(src)))
    total_jobs = len(jobs)
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task("writing shards", total=total_jobs)
        for _ in _run_jobs(jobs, cfg.workers):
            progress.advance(task)
    summary = summarise(out, labels, len(items), cfg)
    summary["shards_built_now"] = total_jobs
    atomic_write_json(out / "dataset.json", summary)
    return summary


def _run_jobs(jobs: list, workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _build_one(job)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_build_one, jobs)


def summarise(out: Path, labels: dict[str, int], n_inputs: int, cfg: ShardsConfig) -> dict[str, Any]:
    """Totals from the per-shard stats (the truth on disk), and `sizes.json` per split."""
    summary: dict[str, Any] = {"identities": len(labels), "inputs_listed": n_inputs, "splits": {}}
    for split in SPLITS:
        split_dir = out / split
        if not split_dir.is_dir():
            continue
        sizes, skipped, converted, reasons = {}, 0, 0, []
        for tar_path in sorted(split_dir.glob("*.tar")):
            stats = read_json(stats_path(tar_path))
            sizes[tar_path.name] = stats["written"]
            skipped += stats["skipped"]
            converted += stats.get("converted", 0)
            reasons.extend(stats.get("skipped_samples", []))
        atomic_write_json(split_dir / "sizes.json", sizes)
        summary["splits"][split] = {
            "shards": len(sizes),
            "samples": sum(sizes.values()),
            "skipped": skipped,
            "converted": converted,
            "skipped_samples": reasons,
        }
    summary["samples"] = sum(s["samples"] for s in summary["splits"].values())
    summary["skipped"] = sum(s["skipped"] for s in summary["splits"].values())
    summary["size"] = list(cfg.target_size) if cfg.target_size else None
    return summary


def print_summary(summary: dict[str, Any], out: str) -> None:
    rows = []
    for split, info in summary["splits"].items():
        rows.append([split, str(info["shards"]), str(info["samples"]), str(info["skipped"]), str(info["converted"])])
    rows.append(["total", "", str(summary["samples"]), str(summary["skipped"]), ""])
    print_table(
        f"shards: {out} — {summary['identities']} identities",
        ["split", "shards", "samples", "skipped", "converted"],
        rows,
    )
    for split, info in summary["splits"].items():
        for item in info["skipped_samples"][:10]:
            print(f"  skipped [{split}] {item['source']}: {item['reason']}")


# -------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["build"], help="what to do with shards")
    parser.add_argument("--config", help="YAML with ShardsConfig fields")
    parser.add_argument("--src", help="identity folders, a train/ test/ ImageFolder tree, or WebDataset tars")
    parser.add_argument("--out", help="output folder, e.g. shards/lfw62")
    parser.add_argument("--min-per-identity", type=int)
    parser.add_argument("--max-per-identity", type=int)
    parser.add_argument("--test-per-identity", type=int)
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--size", type=str, help="side or HxW, e.g. 64 or 112x96")
    parser.add_argument("--samples-per-shard", type=int)
    parser.add_argument("--jpeg-quality", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--identity-field", type=str)
    parser.add_argument("overrides", nargs="*", default=[], help="extra key=value overrides")


def config_from_args(args: argparse.Namespace) -> ShardsConfig:
    overrides = list(args.overrides)
    for name in ShardsConfig.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "size":
            value = "[" + ",".join(str(int(v)) for v in str(value).lower().split("x")) + "]"
        overrides.append(f"{name}={value}")
    cfg = load_config(ShardsConfig, args.config, overrides)
    if not cfg.src or not cfg.out:
        raise ConfigError("shards build needs --src and --out")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = build_shards(cfg)
    print_summary(summary, cfg.out)
    return 0
