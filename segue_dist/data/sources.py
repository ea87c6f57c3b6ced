"""Shard-build inputs: list the images of identity folders, ImageFolder trees or img2dataset-style tars, and read
one input's stored bytes. Used by `segue shards build` (:mod:`segue_dist.shards`), which plans and writes."""

from __future__ import annotations

import json
import os
import tarfile
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segue_dist.data.images import IMAGE_EXTENSIONS, BadImage

SPLITS = ("train", "test")
# Folder names that fix a sample's split in an input tree (ImageFolder trees often call the held-out part "val").
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Separates a tar's path from its member name in a sample's source (a file path may contain "::", a tar name won't).
TAR_SEP = "::"


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
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and not same_path(p, exclude)
    )


def same_path(path: Path, other: Path | None) -> bool:
    if other is None:
        return False
    try:
        return path.resolve() == other.resolve()
    except OSError:
        return False


def inside(path: Path, folder: Path | None) -> bool:
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
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not same_path(here / d, exclude))
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
