"""`segue shards build`: turn face identity folders (or existing tars) into WebDataset shards.

The build is planned first (which file goes to which split, shard and key) from a deterministic listing, then
shards are written independently, each under a temporary name and renamed, with its `_stats.json` written last.
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
import re
import tarfile
import unicodedata
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
# Folder names that fix a sample's split in an input tree (ImageFolder trees often call the held-out part "val").
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Separates a tar's path from its member name in a sample's source (a file path may contain "::", a tar name won't).
TAR_SEP = "::"
# Fixed tar member mtime: identical inputs must give byte-identical shards, whenever they are built.
TAR_MTIME = 0.0


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


@dataclass(frozen=True)
class SourceItem:
    """One input image: where its bytes are and whose face it is."""

    identity: str
    source: str  # a file path, or "<tar path>::<member name>" (shown in stats)
    split: str | None = None  # set when the input layout already fixes the split
    # For tar members: the tar's path and where the member's bytes are in it (offset -1: compressed tar, extract).
    archive: str | None = None
    member: str | None = None
    offset: int = -1
    size: int = -1


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


# --------------------------------------------------------------------------------------------------- listing inputs


def _nfc(name: str) -> str:
    # macOS writes decomposed unicode names; normalise so "José" is one identity whatever the filesystem.
    return unicodedata.normalize("NFC", name)


def _image_files(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS `._x.jpg` AppleDouble files carry no pixels, only Finder metadata.
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _visible_dirs(folder: Path, exclude: Path | None = None) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and not _same_path(p, exclude)
    )


def _same_path(path: Path, other: Path | None) -> bool:
    if other is None:
        return False
    try:
        return path.resolve() == other.resolve()
    except OSError:
        return False


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def list_identity_folders(src: Path, split: str | None = None, exclude: Path | None = None) -> list[SourceItem]:
    items = []
    for ident_dir in _visible_dirs(src, exclude):
        for path in _image_files(ident_dir):
            items.append(SourceItem(_nfc(ident_dir.name), str(path), split))
    return items


def _find_tars(src: Path, exclude: Path | None = None) -> list[Path]:
    """Tars under ``src``, skipping hidden folders and the build's own output folder."""
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _same_path(here / d, exclude))
        found.extend(here / f for f in filenames if f.lower().endswith(".tar") and not f.startswith("."))
    return sorted(found)


def _split_of(parts: tuple[str, ...]) -> str | None:
    """The split named by a folder on the path (``train``, ``test``, or ``val``/``valid``/``validation`` = test)."""
    for part in parts:
        split = SPLIT_ALIASES.get(part.lower())
        if split is not None:
            return split
    return None


def list_tar_inputs(
    src: Path, identity_field: str, exclude: Path | None = None, notes: list[str] | None = None
) -> list[SourceItem]:
    """img2dataset-style tars: identity from the JSON field, else `.cls`, else the `.txt` caption.

    A tar that cannot be read to its end contributes the samples listed before the fault, and the fault goes to
    ``notes`` (a later read of a damaged member is skipped with its reason like any other bad image).
    """
    tars = [src] if src.is_file() else _find_tars(src, exclude)
    items = []
    for tar_path in tars:
        groups: dict[str, dict[str, Any]] = defaultdict(dict)
        # Members of a plain tar are read later by offset (open, seek, read), not by name: finding a member by name
        # means reading every header before it, which made a 10k-sample input tar cost O(n^2).
        plain = _is_plain_tar(tar_path)
        try:
            with tarfile.open(tar_path, "r:" if plain else "r:*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    stem, ext = _split_key(member.name)
                    if stem is None:
                        continue
                    if ext in TAR_IMAGE_EXTS:
                        seekable = plain and not member.issparse()
                        where = (member.offset_data, member.size) if seekable else (-1, -1)
                        groups[stem].setdefault("image", (member.name, *where))
                    elif ext in ("cls", "json", "txt"):
                        raw = tf.extractfile(member)
                        groups[stem][ext] = raw.read().decode("utf-8", "replace") if raw else ""
        except (tarfile.TarError, OSError, EOFError) as exc:
            if notes is not None:
                notes.append(f"input tar {tar_path} unreadable after {len(groups)} samples: {exc}")
        rel_parts = () if src.is_file() else tar_path.relative_to(src).parts[:-1]
        split = _split_of(rel_parts)
        no_image, no_identity = 0, 0
        for stem in sorted(groups):
            group = groups[stem]
            if "image" not in group:
                no_image += 1
                continue
            identity = _identity_from_tar_sample(group, identity_field)
            if identity is None:
                no_identity += 1
                continue
            name, offset, size = group["image"]
            items.append(
                SourceItem(_nfc(identity), f"{tar_path}{TAR_SEP}{name}", split, str(tar_path), name, offset, size)
            )
        if notes is not None and (no_image or no_identity):
            notes.append(
                f"input tar {tar_path}: {no_image} samples without an image and {no_identity} without an identity "
                f"(json field '{identity_field}', .cls or .txt) were not listed"
            )
    return items


def _is_plain_tar(path: Path) -> bool:
    """True for an uncompressed tar (gzip/bzip2/xz/zstd tars are read through tarfile instead)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError:
        return False
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))


def _split_key(name: str) -> tuple[str | None, str]:
    # WebDataset convention: the key is everything up to the first dot of the basename, the extension all after it
    # (so `x.seg.png` is the `seg.png` field of sample `x`, not a second image of it).
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return os.path.join(directory, stem), ext.lower()


def _identity_from_tar_sample(group: dict[str, Any], identity_field: str) -> str | None:
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            if isinstance(meta, dict) and meta.get(identity_field) not in (None, ""):
                return str(meta[identity_field]).strip() or None
        except json.JSONDecodeError:
            pass
    if "cls" in group and group["cls"].strip():
        return group["cls"].strip()
    if "txt" in group and group["txt"].strip():
        return group["txt"].strip()
    return None


def _has_images(folder: Path, exclude: Path | None = None) -> bool:
    return any(_image_files(d) for d in _visible_dirs(folder, exclude))


def list_inputs(
    src: Path, identity_field: str = "identity", exclude: Path | None = None, notes: list[str] | None = None
) -> list[SourceItem]:
    """Detect the input layout: tars, an ImageFolder tree with train/ and test/, or identity folders.

    ``exclude`` (the build's output folder) is never read as input, so `--out` may sit inside `--src`.
    Identity folders win over tars when both are present (a stray archive in a photo folder is not a dataset).
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    if src.is_file():
        if not tarfile.is_tarfile(src):
            raise ValueError(f"--src {src} is a file but not a tar archive")
        return list_tar_inputs(src, identity_field, notes=notes)
    if not src.is_dir():
        raise ValueError(f"--src {src} is neither a folder nor a tar archive")
    subdirs = _visible_dirs(src, exclude)
    split_dirs = {d.name: d for d in subdirs if d.name.lower() in SPLIT_ALIASES}
    if subdirs and len(split_dirs) == len(subdirs) and any(SPLIT_ALIASES[n.lower()] == "train" for n in split_dirs):
        named = sorted(SPLIT_ALIASES[n.lower()] for n in split_dirs)
        if len(named) != len(set(named)):
            raise ValueError(f"{src}: several folders map to one split ({', '.join(sorted(split_dirs))})")
        if any(_has_images(d, exclude) for d in split_dirs.values()):
            items = []
            for name in sorted(split_dirs, key=lambda n: SPLITS.index(SPLIT_ALIASES[n.lower()])):
                items.extend(list_identity_folders(split_dirs[name], SPLIT_ALIASES[name.lower()], exclude))
            return items
    if _has_images(src, exclude):
        return list_identity_folders(src, None, exclude)
    if _find_tars(src, exclude):
        return list_tar_inputs(src, identity_field, exclude, notes)
    return []


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


def read_source_bytes(
    source: str, *, archive: str | None = None, member: str | None = None, offset: int = -1, size: int = -1
) -> bytes:
    """The stored bytes of one input: a file, or a tar member (by offset when known); faults are ``BadImage``."""
    try:
        if archive is None and TAR_SEP in source and not os.path.isfile(source):
            archive, member = source.split(TAR_SEP, 1)
        if archive is None:
            with open(source, "rb") as fh:
                return fh.read()
        if offset >= 0:
            with open(archive, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
            if len(data) != size:
                raise BadImage(f"tar member truncated: {member} ({len(data)} of {size} bytes)")
            return data
        with tarfile.open(archive) as tf:
            fh = tf.extractfile(member or "")
            if fh is None:
                raise BadImage(f"tar member is not a file: {member}")
            return fh.read()
    except BadImage:
        raise
    except (OSError, tarfile.TarError, EOFError, KeyError) as exc:
        raise BadImage(f"cannot read input: {exc}") from None


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


class ShardWriter:
    """WebDataset tar writer (the member layout of ``webdataset.TarWriter``: ``<key>.<field>``, fields sorted, USTAR,
    read-only mode, fixed owner and mtime), in plain ``tarfile``: importing webdataset imports torch, which the shard
    builder does not need and which costs seconds per process."""

    def __init__(self, fileobj: Any) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed by close()

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for field_name in sorted(k for k in sample if not k.startswith("_")):
            data = sample[field_name]
            info = tarfile.TarInfo(f"{key}.{field_name}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def write_shard(tar_path: Path, samples: list[PlannedSample], cfg: ShardsConfig, src_root: str) -> dict[str, Any]:
    """Write one shard atomically and return its stats (the caller writes them last)."""
    stats: dict[str, Any] = {"shard": tar_path.name, "planned": len(samples), "written": 0, "skipped": 0}
    skipped, converted = [], []
    with atomic_open(tar_path, "wb") as fh:
        sink = ShardWriter(fh)
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
            meta = {"identity": sample.identity, "source": source, "orig_size": orig_size}
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
    stats.update(skipped=len(skipped), converted=len(converted), skipped_samples=skipped, converted_samples=converted)
    return stats


def _relative(source: str, root: str) -> str:
    path, sep, member = source.partition(TAR_SEP) if not os.path.isfile(source) else (source, "", "")
    rel = os.path.relpath(path, root) if os.path.isabs(path) == os.path.isabs(root) else path
    return rel + sep + member


def stats_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name[: -len(".tar")] + "._stats.json")


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
    if not (tar_path.is_file() and stats_path(tar_path).is_file()):
        return False
    if plan is None:
        return True
    try:
        return read_json(stats_path(tar_path)).get("plan") == plan
    except (OSError, ValueError, AttributeError):
        return False


def _build_one(job: tuple[str, list[PlannedSample], ShardsConfig, str, str]) -> dict[str, Any]:
    tar_path, samples, cfg, src_root, plan = job
    stats = write_shard(Path(tar_path), samples, cfg, src_root)
    stats["plan"] = plan
    atomic_write_json(stats_path(Path(tar_path)), stats)
    return stats


SHARD_FILE = re.compile(r"^\d{5,}\.tar$|^\d{5,}\._stats\.json$")


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
    if _same_path(src, out) or any(_inside(src, out / split) for split in SPLITS):
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
