"""`segue protect --in PHOTOS/ --out PROTECTED/`: folder mode, one rank's share of a photo tree.

Every photo is written at the same relative path and name, at its own size, in its own format (JPEG at
``--jpeg-quality``, everything else losslessly), its own mode (gray stays gray with a luminance δ, alpha kept bit
for bit, 16-bit gray stays 16-bit) and upright (EXIF orientation applied); metadata is dropped. δ is computed at the
face scale (:mod:`.photo`). The sorted photo list is cut into fixed *chunks* of ``--batch-size`` photos; ranks take
a static round-robin split of the chunks, and G runs once per chunk and face shape. Because a chunk's photos are
fixed by the input order (never by rank, thread or what is already done), the bytes of every photo are the same
whatever the number of ranks or threads and after a resume. Each output is written atomically and then journalled
(:mod:`.folder_records`), so a rerun (after ``kill -9`` too) skips what is done and redoes the rest with identical
bytes. Whoever sees every photo accounted for writes the manifest.

CPU: chunks run in parallel on ``--threads`` threads of one intra-op thread each (decode, G, encode, check); G is
the one :class:`.perturber.Perturber` of both modes (bf16 where the CPU has native bf16, ``--precision``, else fp32).
CUDA: G runs the chunk's faces in bf16 on the GPU; decode, up-sampling and encode stay on the CPU threads.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segue_dist.data.assign import assign_shards
from segue_dist.data.images import BadImage
from segue_dist.protect.folder_records import (
    Journal,
    Listing,
    already_done,
    build_folder_manifest,
    input_stamp,
    list_folder,
    load_journal,
    photo_labels,
    write_folder_manifest,
)
from segue_dist.protect.job import OrderedWrites, ProtectJob
from segue_dist.protect.metadata import KEPT
from segue_dist.protect.options import ProtectOptions, code_range
from segue_dist.protect.perturber import Perturber, make_thread_pool
from segue_dist.protect.photo import OpenedPhoto, PhotoFormat, PhotoResult, face_deltas, finish_photo, open_for_protect
from segue_dist.utils.device import cpus_per_process
from segue_dist.utils.io import atomic_write_bytes
from segue_dist.utils.progress import make_progress
from segue_dist.weights import file_sha256

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


class FolderProtector(ProtectJob):
    """One rank's share of a photo folder: list, label, protect each photo, write atomically, journal.
    ``ValueError`` when G cannot code the identities found."""

    def __init__(self, opts: ProtectOptions) -> None:
        super().__init__(opts)
        cfg = self.gen_cfg
        self.face_size = opts.face_size or training_face_size(self.gen_meta)
        self.spec = PhotoFormat(opts.png_level, opts.jpeg_quality, self.eps_levels)
        self.codes = code_range(opts, cfg)
        self.threads = opts.threads or cpus_per_process()
        self.chunk_size = self.batch_size
        self.listing = list_folder(self.in_dir, exclude=self.out_dir)
        self.labels = photo_labels(self.listing.photos, opts.labels, self.codes)

    def context(self) -> dict[str, Any]:
        """What the output bytes depend on (recorded in ``_protect.json``, checked on resume, copied to the manifest)."""
        labels = "folders" if self.opts.labels is None else f"mapping:{file_sha256(Path(self.opts.labels))}"
        labels += self.codes.context_suffix()
        return {
            "mode": "folder",
            "input": str(self.in_dir),
            "output": str(self.out_dir),
            "generator_sha256": self.generator_sha,
            "eps": self.eps,
            "eps_levels": self.eps_levels,
            # The face scale changes every byte, so it is part of the format a resume must match.
            "format": f"as-input, delta at {self.face_size} px short side",
            "metadata": f"kept: {KEPT}" if self.opts.keep_metadata else "dropped",
            "png_level": self.opts.png_level,
            "jpeg_quality": self.opts.jpeg_quality,
            "labels": labels,
            "face_size": self.face_size,
            # G's batches are the chunks, and a batch's composition (like the device) can flip the odd uint8
            # rounding: a resume with another value warns (settings.SETTINGS_SHOULD_MATCH).
            "batch_size": self.chunk_size,
            "compute": self.perturber.compute_label(),
        }

    def chunks(self) -> list[list[str]]:
        """The sorted photo list cut into consecutive chunks of ``chunk_size``: G's batches, the ranks' unit."""
        photos = self.listing.photos
        return [photos[i : i + self.chunk_size] for i in range(0, len(photos), self.chunk_size)]

    def my_todo(self, journal: dict[str, dict[str, Any]]) -> tuple[list[tuple[list[str], set[str]]], int, int]:
        """This rank's chunks with a photo not done yet, each with the set of its photos to write; also the number
        of photos to write and of photos already done. Ownership comes from the full chunk list first, so ranks of
        a rerun agree on it whatever each has finished."""
        todo, to_write, skipped = [], 0, 0
        for chunk in assign_shards(self.chunks(), self.rank, self.world):  # type: ignore[arg-type]
            write = {p for p in chunk if not already_done(journal.get(p), self.in_dir / p, self.out_dir / p)}
            skipped += len(chunk) - len(write)
            if write:
                todo.append((chunk, write))
                to_write += len(write)
            for rel in write:  # temporaries of this rank's own killed writes (another rank's are not touched)
                out = self.out_dir / rel
                for tmp in out.parent.glob(f".{out.name}.*.tmp") if out.parent.is_dir() else []:
                    tmp.unlink(missing_ok=True)
        return todo, to_write, skipped

    def run(self) -> FolderSummary:
        start = time.perf_counter()
        self.record_settings(self.context())
        todo, to_write, skipped = self.my_todo(load_journal(self.out_dir))
        summary = FolderSummary(self.rank, self.world, to_write + skipped, skipped)
        if todo:
            if self.device.type == "cpu":
                torch.set_num_threads(1)  # the parallelism is across chunks (perturber.make_thread_pool)
            journal = Journal(self.out_dir, self.rank, self.world)
            try:
                summary.entries = self._loop(todo, to_write, self.perturber, journal)
            finally:
                journal.close()
        summary.seconds = time.perf_counter() - start
        return summary

    def _loop(
        self, todo: list[tuple[list[str], set[str]]], to_write: int, perturber: Perturber, journal: Journal
    ) -> list[dict[str, Any]]:
        """Chunks run in a thread pool, at most ``threads + 1`` in flight (memory stays flat in the number of
        photos); the main thread journals results in input order and drives the progress bar."""
        pool = make_thread_pool(self.threads, "chunk")
        done: list[dict[str, Any]] = []
        show = self.opts.progress and self.rank == 0
        with make_progress(disable=not show) as progress:
            task = progress.add_task(f"protect rank {self.rank}/{self.world}", total=to_write)
            t0 = time.perf_counter()

            def on_result(_: str, entries: list[dict[str, Any]]) -> None:
                for entry in entries:
                    journal.add(entry)
                    done.append(entry)
                rate = len(done) / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=len(done), info=f"{rate:,.1f} img/s")
                self.pause()  # tests only (TEST_DELAY_ENV): a window for kill -9 between journalled chunks

            writes = OrderedWrites(on_result)
            try:
                for chunk, write in todo:
                    writes.add("chunk", pool.submit(self.protect_chunk, chunk, write, perturber))
                    writes.settle(self.threads)
                writes.settle(0)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        return done

    def open_one(self, rel: str) -> tuple[dict[str, Any], OpenedPhoto | None, str]:
        """A photo's journal entry so far, and the opened photo or the reason it is quarantined."""
        src = self.in_dir / rel
        entry: dict[str, Any] = {"path": rel, "input": input_stamp(src), "rank": self.rank}
        if rel not in self.labels:
            where = f"not in --labels {self.opts.labels}" if self.opts.labels else "not inside an identity folder"
            return entry, None, f"no label: {where}"
        try:
            photo = open_for_protect(src.read_bytes(), self.opts.max_pixels, self.face_size, self.opts.keep_metadata)
            return entry, photo, ""
        except OSError as exc:
            return entry, None, f"unreadable: {exc}"
        except BadImage as exc:
            return entry, None, str(exc)

    def protect_chunk(self, chunk: list[str], write: set[str], perturber: Perturber) -> list[dict[str, Any]]:
        """Protect one chunk: G over every photo that opens (the batch is the whole chunk, so it does not depend on
        what an earlier run finished), then write the photos in ``write`` atomically; returns their journal
        entries (written or quarantined) in input order."""
        opened = [self.open_one(rel) for rel in chunk]
        ready = [(rel, photo) for rel, (_, photo, _) in zip(chunk, opened, strict=True) if photo is not None]
        deltas = face_deltas([p for _, p in ready], [self.labels[rel] for rel, _ in ready], perturber)
        delta_of = {rel: d for (rel, _), d in zip(ready, deltas, strict=True)}
        entries = []
        for rel, (entry, photo, reason) in zip(chunk, opened, strict=True):
            if rel not in write:
                continue
            if photo is None:
                entries.append({**entry, "status": "quarantined", "reason": reason})
                continue
            result = finish_photo(photo, delta_of[rel], self.spec)
            entries.append(self.written(rel, entry, result))
        return entries

    def written(self, rel: str, entry: dict[str, Any], result: PhotoResult) -> dict[str, Any]:
        """Write one protected photo atomically; its journal entry (or a quarantine entry if the check failed)."""
        encoded = result.encoded
        if encoded.data is None or encoded.check is None:
            return {**entry, "status": "quarantined", "reason": encoded.error or "encoding failed", "mode": result.mode}
        # Not fsynced: a photo torn by a power loss fails the journal's SHA check on resume and is redone, and two
        # fsyncs per photo cost about as much as decoding it (docs/measurements.md).
        atomic_write_bytes(self.out_dir / rel, encoded.data, durable=False)
        check = encoded.check
        return {
            **entry,
            "status": "written",
            "label": self.labels[rel],
            "mode": result.mode,
            "format": result.format,
            "bytes": len(encoded.data),
            "sha256": hashlib.sha256(encoded.data).hexdigest(),  # what already_done compares on resume
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


def protect_folder(opts: ProtectOptions) -> tuple[FolderSummary, dict[str, Any] | None, Listing]:
    """Run this rank's share; returns its summary, the manifest if every photo is now accounted for, the listing."""
    protector = FolderProtector(opts)
    summary = protector.run()
    return summary, protector.finalize(), protector.listing
