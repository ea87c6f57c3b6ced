"""Shard mode: one rank's unfinished shards, through loader -> G -> encode pool -> tar, in bounded memory.

Loader worker processes decode the rank's shards (:mod:`.stream`); the main thread groups each shard's images into
forward batches (:class:`.stream.SizeBuckets`: per size, in shard order, so a batch depends on its shard alone) and
hands each batch to G (:mod:`.perturber`): on the CPU to a pool of ``--threads`` threads of one intra-op thread
each, on CUDA asynchronously from the main thread. The protected batch, quantised and ε-clamped in one vectorised
step, goes to an encode pool (:mod:`.codecs`: threads for PNG, processes for JPEG) that writes each image and
decodes it again to check ε; one tar-writer thread appends results to each shard (:mod:`.output`) in submission
order and finishes shards (:class:`.job.OrderedWrites` bounds what is outstanding). With ``--gpu-codec``
(:mod:`.gpu_codec`) plain JPEG inputs are decoded by nvJPEG and JPEG output is encoded on the GPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segue_dist.data.assign import assign_shards
from segue_dist.data.images import BadImage, decode_image
from segue_dist.data.loader import ShardEnd, open_shard_set
from segue_dist.data.shard_writer import remove_shard_temps, shard_is_finished
from segue_dist.protect.codecs import (
    EncodedImage,
    EncodeSpec,
    encode_and_verify,
    encode_when_ready,
    make_encode_pool,
)
from segue_dist.protect.gpu_codec import GpuCodec
from segue_dist.protect.job import OrderedWrites, ProtectJob, timed_iter
from segue_dist.protect.options import (
    CPU_BATCH_PIXELS,
    ProtectOptions,
    plan_labels,
    resolve_encode_backend,
    resolve_workers,
    sidecar_file,
)
from segue_dist.protect.output import ShardWriter, output_sample
from segue_dist.protect.perturber import make_thread_pool
from segue_dist.protect.stream import Item, ProtectStream, SizeBuckets, iter_items
from segue_dist.utils.io import atomic_write_bytes
from segue_dist.utils.progress import make_progress
from segue_dist.weights import file_sha256


@dataclass
class PendingBatch:
    """A forward batch on its way to the tar: G's result (``compute``, a future on the CPU) and the encode futures
    it leads to. :meth:`results` waits for both, on the tar-writer thread, so batches are written in order."""

    shard: str
    items: list[Item]
    compute: Future | None = None  # CPU: the G thread's future, whose value is the encode futures
    futures: list[Future] = field(default_factory=list)  # encode futures (CUDA: submitted by the main thread)
    ready: list[EncodedImage] | None = None  # results already there (GPU codec)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) the GPU decode path refused

    def results(self) -> list[EncodedImage]:
        if self.ready is not None:
            return self.ready
        futures = self.compute.result() if self.compute is not None else self.futures
        return [image for future in futures for image in future.result()]


@dataclass
class RankSummary:
    rank: int
    world_size: int
    shards_total: int
    shards_skipped: int
    stats: list[dict[str, Any]]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (G: summed over its threads)

    @property
    def written(self) -> int:
        return sum(s["written"] for s in self.stats)

    @property
    def quarantined(self) -> int:
        return sum(s["quarantined"] for s in self.stats)


class Protector(ProtectJob):
    """One rank's job in shard mode: its unfinished shards, through loader -> G -> encode pool -> tar, in bounded
    memory. ``ValueError`` for options that cannot work (``--gpu-codec`` without CUDA, labels G cannot code)."""

    def __init__(self, opts: ProtectOptions) -> None:
        super().__init__(opts)
        self.shard_set = open_shard_set(self.in_dir)
        if opts.gpu_codec and not self.on_cuda:
            raise ValueError("--gpu-codec needs a CUDA device")
        self.labels = plan_labels(opts, self.shard_set, self.gen_meta, self.gen_cfg)
        self.spec = EncodeSpec(opts.format, opts.png_level, opts.jpeg_quality, self.eps_levels)
        self.workers, self.encoders, self.threads = resolve_workers(opts, self.on_cuda)
        self.batch_pixels = 0 if self.on_cuda else CPU_BATCH_PIXELS
        self.inflight = opts.inflight or 2 * self.encoders + 2 + (0 if self.on_cuda else self.threads)
        self.encode_backend = resolve_encode_backend(opts.encode_backend, opts.format, self.encoders)
        self.protected_info = {"generator_sha256": self.generator_sha, "eps": self.eps, **self.spec.describe()}
        self.protected_info["label_source"] = "cls" if opts.labels is None else "sidecar"
        # The batched JPEG codec (--gpu-codec: nvJPEG on this rank's GPU). GpuCodec runs on any torch device, so a
        # caller may attach one on the CPU (torchvision's CPU codecs) to exercise this path without a GPU.
        self.codec: GpuCodec | None = GpuCodec(self.device, self.spec) if opts.gpu_codec else None

    # -------------------------------------------------------------------------------------------------- set-up

    def context(self) -> dict[str, Any]:
        """What the output bytes depend on; recorded in ``_protect.json`` and checked when a run resumes."""
        opts = self.opts
        spec = {"png_level": opts.png_level} if opts.format == "png" else {"jpeg_quality": opts.jpeg_quality}
        labels = "cls" if opts.labels is None else f"sidecar:{file_sha256(sidecar_file(opts.labels))}"
        labels += self.labels.codes.context_suffix()
        return {
            "generator_sha256": self.generator_sha,
            "eps": self.eps,
            "eps_levels": self.eps_levels,
            "format": opts.format,
            **spec,
            "labels": labels,
            # G's batches are each shard's size buckets (batch_size images, batch_pixels pixels at most), and a batch's composition (like the compute) can flip the
            # odd uint8 rounding: a resume with another value warns (options.SETTINGS_SHOULD_MATCH).
            "compute": self.perturber.compute_label(),
            "batch_size": self.batch_size,
            "batch_pixels": self.batch_pixels,
            "generator_num_classes": int(self.gen_meta.get("num_classes", 0)),
        }

    def prepare_output(self) -> None:
        self.record_settings(self.context())
        labels_file = self.in_dir / "labels.json"
        if labels_file.is_file():
            atomic_write_bytes(self.out_dir / "labels.json", labels_file.read_bytes())

    def my_shards(self) -> tuple[list[str], int]:
        """This rank's shards still to do. Assigned from the full sorted list first, filtered second, so that ranks
        starting at different moments of a rerun still agree on who owns which shard."""
        mine = assign_shards(self.shard_set.shards, self.rank, self.world)
        todo = [s for s in mine if not shard_is_finished(self.out_dir / Path(s).name)]
        for shard in todo:
            remove_shard_temps(self.out_dir / Path(shard).name)
        return todo, len(mine) - len(todo)

    # ----------------------------------------------------------------------------------------------------- run

    def run(self) -> RankSummary:
        start = time.perf_counter()
        for message in self.labels.warnings:
            self.warn(message)
        self.prepare_output()
        todo, skipped = self.my_shards()
        if not self.on_cuda:
            torch.set_num_threads(1)  # the parallelism is across batches (perturber.make_thread_pool)
        stats = self._protect_shards(todo) if todo else []
        seconds = time.perf_counter() - start
        return RankSummary(self.rank, self.world, len(todo) + skipped, skipped, stats, seconds, self.timer.rounded())

    def _protect_shards(self, todo: list[str]) -> list[dict[str, Any]]:
        stream = ProtectStream(
            todo,
            label_map=self.labels.label_map,
            max_pixels=self.opts.max_pixels,
            gpu_jpeg=self.codec is not None,
            label_offset=self.labels.codes.offset,
        )
        expected = sum(self.shard_set.sizes[Path(s).name] for s in todo)
        pool = make_encode_pool(self.encode_backend, self.encoders)
        # CPU: G on a pool of one-intra-op-thread threads; CUDA (or a codec attached on the CPU): the main thread.
        g_pool = None if self.on_cuda or self.codec is not None else make_thread_pool(self.threads, "generator")
        try:
            items = timed_iter(iter_items(stream, self.workers), self.timer, "wait_input")
            return self._loop(items, pool, g_pool, expected)
        finally:
            if g_pool is not None:
                g_pool.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)

    def _loop(
        self, items: Iterator[Item | ShardEnd], pool: Executor, g_pool: Executor | None, expected: int
    ) -> list[dict[str, Any]]:
        """Main thread: group items into batches and hand them to G; the encode pool and one tar-writer thread do
        the rest.

        Every change to a shard's output goes through the single tar-writer thread, in submission order, so a
        shard's bytes never depend on timing; the main thread waits only when more than ``inflight`` writes are
        outstanding (which bounds memory) and never on fsync.
        """
        writers: dict[str, ShardWriter] = {}
        opened: dict[str, ShardWriter] = {}  # started and not yet finished: what an error must abort
        buckets: dict[str, SizeBuckets] = {}
        finished: list[dict[str, Any]] = []
        tar_thread = ThreadPoolExecutor(1, thread_name_prefix="tar-writer")  # one thread: tasks run in order
        show = self.opts.progress and self.rank == 0
        with make_progress(disable=not show) as progress:
            task = progress.add_task(f"protect rank {self.rank}/{self.world}", total=expected)
            t0, done = time.perf_counter(), [0]

            def on_result(kind: str, value: Any) -> None:
                if kind == "end":
                    finished.append(value)
                    opened.pop(value["shard"], None)
                    return
                done[0] += value
                rate = done[0] / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=done[0], info=f"{rate:,.0f} img/s")

            writes = OrderedWrites(on_result, self.timer)

            def writer_for(shard: str) -> ShardWriter:
                if shard not in writers:  # an empty shard still gets its (empty) tar
                    writers[shard] = opened[Path(shard).name] = self._writer(shard)
                return writers[shard]

            def submit(writer: ShardWriter, batch: list[Item]) -> None:
                entry = self._submit(batch, pool, g_pool)
                writes.add("batch", tar_thread.submit(self._write_batch, writer, entry))

            try:
                for item in items:
                    writer = writer_for(item.shard)
                    if isinstance(item, ShardEnd):
                        for batch in buckets.pop(item.shard).drain() if item.shard in buckets else []:
                            submit(writer, batch)
                        writes.add("end", tar_thread.submit(writers.pop(item.shard).finish))
                    else:
                        bad = item.error or self._label_error(item)
                        if bad is not None:
                            writes.add("bad", tar_thread.submit(writer.quarantine, item.key, bad))
                            continue
                        for batch in buckets.setdefault(
                            item.shard, SizeBuckets(self.batch_size, self.batch_pixels)
                        ).add(item):
                            submit(writer, batch)
                    writes.settle(self.inflight)
                writes.settle(0)
            except BaseException:
                tar_thread.shutdown(wait=True, cancel_futures=True)
                for writer in opened.values():
                    writer.abort()
                raise
            finally:
                tar_thread.shutdown(wait=True)
        return finished

    def _writer(self, shard: str) -> ShardWriter:
        name = Path(shard).name
        context = {"rank": self.rank, "world_size": self.world, "eps": self.eps, "eps_levels": self.eps_levels}
        context.update(self.spec.describe(), generator_sha256=self.generator_sha)
        return ShardWriter(self.out_dir, name, self.shard_set.sizes[name], context)

    def _label_error(self, item: Item) -> str | None:
        if 0 <= item.label < self.labels.codes.limit:
            return None
        return f"label {item.label} outside the generator's codes 0..{self.labels.codes.limit - 1}"

    def _submit(self, batch: list[Item], pool: Executor, g_pool: Executor | None) -> PendingBatch:
        """Start G on the batch (CPU: on a G thread; CUDA: asynchronously here) and its encoding in the pool, which
        overlaps with the next batches' forwards."""
        shard = batch[0].shard
        if g_pool is not None:
            return PendingBatch(shard, batch, compute=g_pool.submit(self._protect_on_cpu, batch, pool))
        rejected: list[tuple[str, str]] = []
        codec = self.codec
        with self.timer("forward"):
            batch, originals = self._originals(rejected, batch, codec)
            if not batch:
                return PendingBatch(shard, [], ready=[], rejected=rejected)
            protected = self.perturber(originals, self._labels_of(batch))
        if codec is not None and codec.encode_on_gpu:
            with self.timer("gpu_codec"):
                results = codec.encode_and_verify(protected, originals)
            if results is not None:
                return PendingBatch(shard, batch, ready=results, rejected=rejected)
        sources = [it.image for it in batch]
        if any(s is None for s in sources):  # decoded by nvJPEG: the originals live on the GPU only
            sources = list(originals.cpu().numpy())
        host, ready = self._to_host(protected)
        return PendingBatch(shard, batch, futures=self._encode(pool, host, sources, ready), rejected=rejected)

    def _protect_on_cpu(self, batch: list[Item], pool: Executor) -> list[Future]:
        """G thread (one intra-op thread): the batch through G, quantised and clamped at once, then its encoding
        handed to the pool; returns the encode futures."""
        sources = [it.image for it in batch]
        with self.timer("forward"):
            protected = self.perturber(torch.from_numpy(np.stack(sources)), self._labels_of(batch))  # type: ignore[arg-type]
        return self._encode(pool, protected.numpy(), sources, None)

    def _encode(self, pool: Executor, host: np.ndarray, sources: list[Any], ready: Any) -> list[Future]:
        step = max(1, math.ceil(len(host) / self.encoders))  # one task per encoder keeps them all busy
        futures = []
        for i in range(0, len(host), step):
            args = (host[i : i + step], sources[i : i + step], self.spec)
            futures.append(
                pool.submit(encode_when_ready, ready, *args) if ready else pool.submit(encode_and_verify, *args)
            )
        return futures

    @staticmethod
    def _labels_of(batch: list[Item]) -> torch.Tensor:
        return torch.tensor([it.label for it in batch], dtype=torch.long)

    def _to_host(self, protected: torch.Tensor) -> tuple[np.ndarray, Any]:
        """The protected CUDA batch as a host array, and a CUDA event the encoders wait on (None if already there).

        With a thread pool the copy is asynchronous, into fresh pinned memory (PyTorch's caching host allocator
        reuses it only once nothing refers to it), so the main thread never waits for the GPU; a process pool
        needs the bytes now."""
        if self.encode_backend == "process" or not self.on_cuda:
            return protected.cpu().numpy(), None
        host = torch.empty(protected.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(protected, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host.numpy(), ready

    def _originals(
        self, rejected: list[tuple[str, str]], batch: list[Item], codec: GpuCodec | None
    ) -> tuple[list[Item], torch.Tensor]:
        """The batch's original images as one uint8 (N, H, W, 3) tensor; nvJPEG-decoded ones are on the GPU."""
        if any(it.jpeg is not None for it in batch):
            assert codec is not None
            return self._gpu_decoded(rejected, batch, codec)
        arrays = [it.image for it in batch if it.image is not None]
        if not self.on_cuda:
            return batch, torch.from_numpy(np.stack(arrays))
        # Stacked straight into pinned memory, so the copy to the GPU is one asynchronous DMA.
        staged = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(arrays, out=staged.numpy())
        return batch, staged

    def _gpu_decoded(
        self, rejected: list[tuple[str, str]], batch: list[Item], codec: GpuCodec
    ) -> tuple[list[Item], torch.Tensor]:
        decoded = iter(codec.decode([it.jpeg for it in batch if it.jpeg is not None]))  # type: ignore[misc]
        kept, images = [], []
        for item in batch:
            if item.jpeg is None:
                image: torch.Tensor | None = torch.from_numpy(item.image).to(self.device)  # type: ignore[arg-type]
            else:
                chw = next(decoded)
                image = chw.permute(1, 2, 0) if chw is not None and tuple(chw.shape[-2:]) == item.size else None
                if image is None:
                    image = self._cpu_fallback(rejected, item)
                item.jpeg = None
            if image is not None:
                kept.append(item)
                images.append(image)
        return kept, (torch.stack(images) if images else torch.empty(0))

    def _cpu_fallback(self, rejected: list[tuple[str, str]], item: Item) -> torch.Tensor | None:
        """Decode a JPEG nvJPEG refused with the careful CPU decoder; if that fails too, the item is rejected."""
        try:
            img = decode_image(item.jpeg)  # type: ignore[arg-type]
        except BadImage as exc:
            rejected.append((item.key, str(exc)))
            return None
        if (img.height, img.width) != item.size:
            rejected.append((item.key, f"decoded size {img.width}x{img.height} differs from the JPEG header"))
            return None
        item.image = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(item.image.copy()).to(self.device)

    def _write_batch(self, writer: ShardWriter, entry: PendingBatch) -> int:
        """Tar-writer thread: wait for the batch's encoding, then write it (and what its decode rejected)."""
        for key, reason in entry.rejected:
            writer.quarantine(key, reason)
        for item, encoded in zip(entry.items, entry.results(), strict=True):
            if encoded.data is None or encoded.check is None:
                writer.quarantine(item.key, encoded.error or "encoding failed")
                continue
            writer.write(output_sample(item, encoded.data, self.spec.extension, self.protected_info), encoded.check)
        self.pause()  # tests only (TEST_DELAY_ENV): a window for kill -9 with the shard's temporary file open
        return len(entry.items) + len(entry.rejected)
