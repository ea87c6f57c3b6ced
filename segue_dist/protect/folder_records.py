"""Folder mode's bookkeeping: which files are photos (and which are ignored, and why), whose face each photo is,
the per-photo journal that makes a rerun resume, and the manifest that balances files in against files accounted for.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segue_dist.data.images import IMAGE_EXTENSIONS
from segue_dist.data.sources import same_path
from segue_dist.protect.options import CodeRange
from segue_dist.protect.photo import LOSSLESS_FORMATS
from segue_dist.utils.io import atomic_write_json, atomic_write_text

# GIFs are listed so that an animated one is quarantined with its reason rather than silently ignored.
PHOTO_EXTENSIONS = (*IMAGE_EXTENSIONS, ".gif")
# Files operating systems drop into photo folders: never photos, counted as ignored.
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "icon\r"}
JOURNAL_DIR = "_journal"
FOLDER_MANIFEST = "_manifest.json"
FOLDER_QUARANTINE = "_quarantine.jsonl"


@dataclass
class Listing:
    """Every regular file under the input: ``photos`` (relative POSIX paths, sorted) and ``ignored`` (path -> why)."""

    photos: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> int:
        return len(self.photos) + len(self.ignored)


def ignore_reason(rel: Path) -> str | None:
    """Why a file is not a photo (hidden, system or non-image file), or None for a photo candidate."""
    if any(part.startswith(".") for part in rel.parts):
        return "hidden file or folder"
    if rel.name.lower() in SYSTEM_FILES:
        return "system file"
    if rel.suffix.lower() not in PHOTO_EXTENSIONS:
        return f"not an image extension ({rel.suffix or 'none'})"
    return None


def list_folder(root: Path, exclude: Path | None = None) -> Listing:
    """Walk ``root`` (sorted, not following folder links), skipping ``exclude`` (an output nested in the input)."""
    listing = Listing()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not same_path(here / d, exclude))
        for name in sorted(filenames):
            rel = (here / name).relative_to(root)
            reason = ignore_reason(rel)
            if reason is None:
                listing.photos.append(rel.as_posix())
            else:
                listing.ignored[rel.as_posix()] = reason
    listing.photos.sort()
    return listing


def read_label_mapping(path: str) -> dict[str, Any]:
    """``--labels`` for folders: JSON ``{relative path: identity}`` (optionally under ``"labels"``) or a CSV of
    ``path,identity`` rows (a header row is skipped when its second cell is not a known identity)."""
    if path.lower().endswith(".json"):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data = data.get("labels", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object mapping relative path -> identity")
        return {str(k): v for k, v in data.items()}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh) if row and len(row) >= 2]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename"):
        rows = rows[1:]
    return {row[0].strip(): row[1].strip() for row in rows}


def photo_labels(photos: list[str], labels_path: str | None, codes: CodeRange) -> dict[str, int]:
    """Relative path -> G's code. From the identity folder (first path component, identities numbered in sorted
    order as `segue shards build` does) or from ``labels_path``; integer identities are used as labels directly;
    ``codes.offset`` is added to every label (identities numbered after G's training classes). Photos without an identity
    are left out (and quarantined by the caller). ``ValueError`` when G cannot code them.
    """
    if labels_path is None:
        identity = {p: unicodedata.normalize("NFC", p.split("/")[0]) for p in photos if "/" in p}
    else:
        mapping = read_label_mapping(labels_path)
        identity = {p: mapping[p] for p in photos if p in mapping}
    values = set(identity.values())
    if all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in values):
        index_of = {v: int(v) for v in values}
    else:
        index = {name: i for i, name in enumerate(sorted({str(v) for v in values}))}
        index_of = {v: index[str(v)] for v in values}
    top = max(index_of.values(), default=-1)
    if not codes.fits(top):
        raise ValueError(f"{len(values)} identities / labels up to {top}: G codes {codes.room()}")
    return {p: index_of[v] + codes.offset for p, v in identity.items()}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_stamp(path: Path) -> list[int]:
    """(size, mtime_ns) of an input: a changed input is protected again on resume."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class Journal:
    """This rank's append-only record of finished photos (one JSON line each, written after the photo's rename).

    A line lost to ``kill -9`` only means that photo is done again on rerun (same bytes, atomically replaced)."""

    def __init__(self, out_dir: Path, rank: int, world: int) -> None:
        folder = out_dir / JOURNAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.fh = open(folder / f"rank{rank}of{world}.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - long-lived

    def add(self, entry: dict[str, Any]) -> None:
        self.fh.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def load_journal(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> latest entry over every rank's journal (any world size); torn lines are skipped."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted((out_dir / JOURNAL_DIR).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            entries[entry["path"]] = entry
    return entries


def already_done(entry: dict[str, Any] | None, in_path: Path, out_path: Path) -> bool:
    """True when the journal says this input (same size and mtime) was handled and, if written, the output file
    still holds exactly the recorded bytes."""
    if entry is None or entry.get("input") != input_stamp(in_path):
        return False
    if entry["status"] == "quarantined":
        return True
    return out_path.is_file() and out_path.stat().st_size == entry["bytes"] and file_digest(out_path) == entry["sha256"]


def format_rows(written: list[dict[str, Any]], eps_levels: int) -> dict[str, dict[str, Any]]:
    """Per output format: files, max and mean |δ| measured on the written files, and whether ε is guaranteed."""
    rows: dict[str, dict[str, Any]] = {}
    for fmt in sorted({e["format"] for e in written}):
        mine = [e for e in written if e["format"] == fmt]
        top = max(e["max_abs"] for e in mine)
        rows[fmt] = {
            "files": len(mine),
            "max_abs_delta": top,
            "mean_abs_delta": round(sum(e["mean_abs"] for e in mine) / len(mine), 4),
            "psnr_mean": round(sum(e["psnr"] for e in mine) / len(mine), 3),
            "eps_bound_holds": top <= eps_levels if fmt in LOSSLESS_FORMATS else None,
        }
    return rows


def build_folder_manifest(
    listing: Listing, entries: dict[str, dict[str, Any]], context: dict[str, Any]
) -> dict[str, Any] | None:
    """The manifest once every photo has an entry (else None): files in = written + quarantined + ignored."""
    if any(p not in entries for p in listing.photos):
        return None
    mine = [entries[p] for p in listing.photos]
    written = [e for e in mine if e["status"] == "written"]
    quarantined = [{"path": e["path"], "reason": e["reason"]} for e in mine if e["status"] == "quarantined"]
    balanced = listing.files == len(written) + len(quarantined) + len(listing.ignored)
    formats = format_rows(written, context["eps_levels"])
    lossy = any(row["eps_bound_holds"] is None for row in formats.values())
    return {
        **context,
        "files_in": listing.files,
        "photos": len(listing.photos),
        "written": len(written),
        "quarantined": len(quarantined),
        "ignored": len(listing.ignored),
        "balanced": balanced,
        "eps_bound_holds": None if lossy else all(row["eps_bound_holds"] for row in formats.values()),
        "measured_max_abs": max((e["max_abs"] for e in written), default=0),
        "formats": formats,
        "quarantined_files": quarantined,
        "ignored_files": [{"path": p, "reason": r} for p, r in sorted(listing.ignored.items())],
    }


def write_folder_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """``_quarantine.jsonl`` then (last) ``_manifest.json``; deterministic, so any rank may (re)write them."""
    lines = [json.dumps(q, ensure_ascii=False, sort_keys=True) for q in manifest["quarantined_files"]]
    atomic_write_text(out_dir / FOLDER_QUARANTINE, "".join(line + "\n" for line in lines))
    atomic_write_json(out_dir / FOLDER_MANIFEST, manifest)
