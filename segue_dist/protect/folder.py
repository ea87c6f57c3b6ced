"""`segue protect --in PHOTOS/ --out PROTECTED/`: folder mode, one rank's share of a photo tree.

Every photo is written at the same relative path and name, at its own size, in its own format (JPEG at
``--jpeg-quality``, everything else losslessly), its own mode (gray stays gray with a luminance δ, alpha kept bit
for bit, 16-bit gray stays 16-bit) and upright (EXIF orientation applied); metadata is dropped. δ is computed at the
face scale (:mod:`.photo`). Ranks take a static round-robin split of the sorted photo list; each output is written
atomically and then journalled (:mod:`.folder_records`), so a rerun (after ``kill -9`` too) skips what is done and
redoes the rest with identical bytes. Whoever sees every photo accounted for writes the manifest.

CPU: each photo goes through G on its own (one intra-op thread, several photos in parallel), as in shard mode, so
bytes never depend on ranks or threads. CUDA works (one photo per forward, bf16) but is not tuned yet.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segue_dist.checkpoint import file_sha256, generator_sha256, load_generator
from segue_dist.data.assign import assign_shards
from segue_dist.protect.codecs import EncodeSpec
from segue_dist.protect.compute import Perturber, make_thread_pool
from segue_dist.protect.folder_records import (
    Journal,
    Listing,
    already_done,
    build_folder_manifest,
    file_digest,
    input_stamp,
    list_folder,
    load_journal,
    photo_labels,
    write_folder_manifest,
)
from segue_dist.protect.options import ProtectOptions, cpus_per_rank
from segue_dist.protect.photo import protect_photo
from segue_dist.protect.pipeline import refuse_in_place
from segue_dist.protect.quantise import eps_levels
from segue_dist.protect.settings import check_or_record_settings
from segue_dist.utils import dist
from segue_dist.utils.device import resolve_device
from segue_dist.utils.io import atomic_write_bytes
from segue_dist.utils.progress import console, make_progress

# Face scale when the generator's JSON does not record its training size: the attacker's usual 112 px crop.
DEFAULT_FACE_SIZE = 112


def is_folder_input(opts: ProtectOptions) -> bool:
    """Folder mode when asked, or (auto) when ``--in`` is a folder that is not a shard split."""
    if opts.input_format != "auto":
        return opts.input_format == "folder"
    inp = Path(opts.inp)
    return inp.is_dir() and not (inp / "sizes.json").is_file() and not any(inp.glob("*.tar"))


def training_face_size(gen_meta: dict[str, Any]) -> int:
    """Short side of the images G was trained on (generator.json's train_config), else ``DEFAULT_FACE_SIZE``."""
    size = gen_meta.get("train_config", {}).get("data", {}).get("image_size")
    return int(min(size)) if size else DEFAULT_FACE_SIZE


@dataclass
class FolderSummary:
    rank: int
    world_size: int
    photos_total: int  # this rank's share
    skipped: int  # already done by an earlier run
    entries: list[dict[str, Any]] = field(default_factory=list)  # done now
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(e["status"] == status for e in self.entries)


class FolderProtector:
    """One rank's share of a photo folder: list, label, protect each photo, write atomically, journal."""

    def __init__(self, opts: ProtectOptions) -> None:
        self.opts = opts
        self.rank, self.world = dist.rank(), dist.world_size()
        self.in_dir, self.out_dir = Path(opts.inp), Path(opts.out)
        refuse_in_place(self.in_dir, self.out_dir)
        self.device = resolve_device(opts.device)
        self.generator, self.gen_meta = load_generator(opts.generator, self.device)
        cfg = self.generator.config  # type: ignore[attr-defined]
        self.eps = float(cfg.eps)
        self.levels = eps_levels(self.eps)
        self.generator_sha = generator_sha256(opts.generator, self.gen_meta)
        self.face_size = opts.face_size or training_face_size(self.gen_meta)
        self.spec = EncodeSpec("as-input", opts.png_level, opts.jpeg_quality, self.levels)
        self.limit = 2 ** int(cfg.bits) if opts.allow_unseen_labels else int(cfg.num_classes)
        self.hint = "" if opts.allow_unseen_labels else f" (--allow-unseen-labels accepts up to {2**cfg.bits - 1})"
        self.threads = opts.threads or cpus_per_rank()
        self.listing = list_folder(self.in_dir, exclude=self.out_dir)
        self.labels = photo_labels(self.listing.photos, opts.labels, self.limit, self.hint)

    def context(self) -> dict[str, Any]:
        """What the output bytes depend on (recorded in ``_protect.json``, checked on resume, copied to the manifest)."""
        labels = "folders" if self.opts.labels is None else f"mapping:{file_sha256(Path(self.opts.labels))}"
        return {
            "mode": "folder",
            "input": str(self.in_dir),
            "output": str(self.out_dir),
            "generator_sha256": self.generator_sha,
            "eps": self.eps,
            "eps_levels": self.levels,
            # The face scale changes every byte, so it is part of the format a resume must match.
            "format": f"as-input, delta at {self.face_size} px short side",
            "png_level": self.opts.png_level,
            "jpeg_quality": self.opts.jpeg_quality,
            "labels": labels,
            "face_size": self.face_size,
        }

    def my_todo(self, journal: dict[str, dict[str, Any]]) -> tuple[list[str], int]:
        """This rank's photos not done yet. Assigned from the full sorted list first, then filtered, so ranks of a
        rerun agree on ownership whatever each has finished."""
        mine = assign_shards(self.listing.photos, self.rank, self.world)
        todo = [p for p in mine if not already_done(journal.get(p), self.in_dir / p, self.out_dir / p)]
        for rel in todo:  # temporaries of this rank's own killed writes (another rank's are not touched)
            out = self.out_dir / rel
            for tmp in out.parent.glob(f".{out.name}.*.tmp") if out.parent.is_dir() else []:
                tmp.unlink(missing_ok=True)
        return todo, len(mine) - len(todo)

    def run(self) -> FolderSummary:
        start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for message in check_or_record_settings(self.out_dir, self.context()):
            self.warn(message)
        todo, skipped = self.my_todo(load_journal(self.out_dir))
        summary = FolderSummary(self.rank, self.world, len(todo) + skipped, skipped)
        if todo:
            if self.device.type == "cpu":
                torch.set_num_threads(1)  # the parallelism is across photos (see Perturber._one)
            perturber = Perturber(self.generator, self.device, self.levels, threads=1)
            journal = Journal(self.out_dir, self.rank, self.world)
            try:
                summary.entries = self._loop(todo, perturber, journal)
            finally:
                journal.close()
                perturber.close()
        summary.seconds = time.perf_counter() - start
        return summary

    def _loop(self, todo: list[str], perturber: Perturber, journal: Journal) -> list[dict[str, Any]]:
        """Photos run in a thread pool, at most ``2 x threads`` in flight (memory stays flat in the number of
        photos); the main thread journals results in input order and drives the progress bar."""
        pool = make_thread_pool(self.threads, "photo")
        pending: deque[Future] = deque()
        done: list[dict[str, Any]] = []
        show = self.opts.progress and self.rank == 0
        with make_progress(disable=not show) as progress:
            task = progress.add_task(f"protect rank {self.rank}/{self.world}", total=len(todo))
            t0 = time.perf_counter()

            def collect(limit: int) -> None:
                while len(pending) > limit:
                    entry = pending.popleft().result()
                    journal.add(entry)
                    done.append(entry)
                    rate = len(done) / max(time.perf_counter() - t0, 1e-9)
                    progress.update(task, completed=len(done), info=f"{rate:,.1f} img/s")

            try:
                for rel in todo:
                    pending.append(pool.submit(self.protect_one, rel, perturber))
                    collect(2 * self.threads)
                collect(0)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        return done

    def protect_one(self, rel: str, perturber: Perturber) -> dict[str, Any]:
        """Protect one photo and write it atomically; returns its journal entry (written or quarantined)."""
        src, dst = self.in_dir / rel, self.out_dir / rel
        entry: dict[str, Any] = {"path": rel, "input": input_stamp(src), "rank": self.rank}
        label = self.labels.get(rel)
        if label is None:
            where = f"not in --labels {self.opts.labels}" if self.opts.labels else "not inside an identity folder"
            return {**entry, "status": "quarantined", "reason": f"no label: {where}"}
        try:
            data = src.read_bytes()
        except OSError as exc:
            return {**entry, "status": "quarantined", "reason": f"unreadable: {exc}"}
        result = protect_photo(data, label, perturber, self.spec, self.face_size, self.opts.max_pixels)
        encoded = result.encoded
        if encoded.data is None or encoded.check is None:
            return {**entry, "status": "quarantined", "reason": encoded.error or "encoding failed", "mode": result.mode}
        atomic_write_bytes(dst, encoded.data)
        check = encoded.check
        return {
            **entry,
            "status": "written",
            "label": label,
            "mode": result.mode,
            "format": result.format,
            "bytes": len(encoded.data),
            "sha256": file_digest(dst),
            "max_abs": check.max_abs,
            "mean_abs": round(check.mean_abs, 4),
            "psnr": round(check.psnr, 3),
        }

    def finalize(self) -> dict[str, Any] | None:
        """Write the manifest if every photo (of every rank) is accounted for; else None."""
        manifest = build_folder_manifest(self.listing, load_journal(self.out_dir), self.context())
        if manifest is not None:
            write_folder_manifest(self.out_dir, manifest)
        return manifest

    def warn(self, message: str) -> None:
        if self.rank == 0:
            console.print(f"[yellow]warning:[/yellow] {message}")


def protect_folder(opts: ProtectOptions) -> tuple[FolderSummary, dict[str, Any] | None, Listing]:
    """Run this rank's share; returns its summary, the manifest if every photo is now accounted for, the listing."""
    protector = FolderProtector(opts)
    summary = protector.run()
    return summary, protector.finalize(), protector.listing
