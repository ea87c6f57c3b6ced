"""One rank's protect job: its unfinished shards, through loader -> G -> encode pool -> tar, in bounded memory.

The main thread groups each shard's images into forward batches and runs G (:mod:`.compute`); an encode pool
(:mod:`.codecs`, threads for PNG, processes for JPEG) writes each image and decodes it again to check ε, overlapping
the next forward; one tar-writer thread appends results to each shard (:mod:`.output`) in submission order and
finishes shards, so the main thread waits only when more than ``inflight`` batches are outstanding. With
``--gpu-codec`` (:mod:`.gpu_codec`) plain JPEG inputs are decoded by nvJPEG and JPEG output is encoded on the GPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segue_dist.checkpoint import generator_sha256, load_generator
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
from segue_dist.protect.compute import Perturber
from segue_dist.protect.gpu_codec import GpuCodec
from segue_dist.protect.options import (
    ProtectOptions,
    delay_for_tests_s,
    resolve_batch_size,
    resolve_encode_backend,
    resolve_workers,
)
from segue_dist.protect.output import ShardWriter, output_sample
from segue_dist.protect.quantise import eps_levels
from segue_dist.protect.settings import check_or_record_settings, plan_labels, protect_settings
from segue_dist.protect.stream import Item, ProtectStream, SizeBuckets, iter_items
from segue_dist.utils import dist
from segue_dist.utils.device import resolve_device
from segue_dist.utils.io import atomic_write_bytes
from segue_dist.utils.progress import console, make_progress


@dataclass
class PendingBatch:
    """A forward batch whose encoding runs in the pool; written in submission order."""

    shard: str
    items: list[Item]
    futures: list[Future] | None  # None: results already in ``ready``
    ready: list[EncodedImage] | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) the GPU decode path refused

    def done(self) -> bool:
        return self.futures is None or all(f.done() for f in self.futures)

    def results(self) -> list[EncodedImage]:
        if self.ready is not None:
            return self.ready
        assert self.futures is not None
        return [image for future in self.futures for image in future.result()]


@dataclass
class RankSummary:
    rank: int
    world_size: int
    shards_total: int
    shards_skipped: int
    stats: list[dict[str, Any]]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # main-thread seconds per phase

    @property
    def written(self) -> int:
        return sum(s["written"] for s in self.stats)

    @property
    def quarantined(self) -> int:
        return sum(s["quarantined"] for s in self.stats)


class PhaseTimer:
    """Main-thread seconds per phase (waiting for input, forward, GPU codec, waiting for encoders, writing): where
    a slow job spends its time, reported in the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def timed_iter(items: Iterator[Any], timer: PhaseTimer, phase: str) -> Iterator[Any]:
    while True:
        with timer(phase):
            item = next(items, None)
        if item is None:
            return
        yield item


class Protector:
    """One rank's job: its unfinished shards, through loader -> G -> encode pool -> tar, in bounded memory."""

    def __init__(self, opts: ProtectOptions) -> None:
        self.opts = opts
        self.rank, self.world = dist.rank(), dist.world_size()
        self.in_dir, self.out_dir = Path(opts.inp), Path(opts.out)
        refuse_in_place(self.in_dir, self.out_dir)
        self.shard_set = open_shard_set(self.in_dir)
        self.device = resolve_device(opts.device)
        self.on_cuda = self.device.type == "cuda"
        if opts.gpu_codec and not self.on_cuda:
            raise ValueError("--gpu-codec needs a CUDA device")
        self.generator, self.gen_meta = load_generator(opts.generator, self.device)
        if self.on_cuda:
            self.generator = self.generator.to(memory_format=torch.channels_last)
        cfg = self.generator.config  # type: ignore[attr-defined]
        self.eps = float(cfg.eps)
        self.levels = eps_levels(self.eps)
        self.generator_sha = generator_sha256(opts.generator, self.gen_meta)
        self.labels = plan_labels(opts, self.shard_set, self.gen_meta, cfg)
        self.spec = EncodeSpec(opts.format, opts.png_level, opts.jpeg_quality, self.levels)
        self.workers, self.encoders, self.threads = resolve_workers(opts, self.on_cuda)
        self.batch_size = resolve_batch_size(opts, self.on_cuda)
        self.inflight = opts.inflight or 2 * self.encoders + 2
        self.encode_backend = resolve_encode_backend(opts.encode_backend, opts.format, self.encoders)
        self.protected_info = {"generator_sha256": self.generator_sha, "eps": self.eps, **self.spec.describe()}
        self.protected_info["label_source"] = "cls" if opts.labels is None else "sidecar"
        self.delay = delay_for_tests_s()
        self.timer = PhaseTimer()
        # The batched JPEG codec (--gpu-codec: nvJPEG on this rank's GPU). GpuCodec runs on any torch device, so a
        # caller may attach one on the CPU (torchvision's CPU codecs) to exercise this path without a GPU.
        self.codec: GpuCodec | None = GpuCodec(self.device, self.spec) if opts.gpu_codec else None

    # -------------------------------------------------------------------------------------------------- set-up

    def prepare_output(self, compute: str) -> list[str]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        settings = protect_settings(self.opts, self.gen_meta, self.generator_sha, self.eps, compute, self.batch_size)
        messages = check_or_record_settings(self.out_dir, settings)
        labels_file = self.in_dir / "labels.json"
        if labels_file.is_file():
            atomic_write_bytes(self.out_dir / "labels.json", labels_file.read_bytes())
        return messages

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
        perturber = Perturber(self.generator, self.device, self.levels, self.threads)
        try:
            for message in [*self.labels.warnings, *self.prepare_output(perturber.compute_label())]:
                self.warn(message)
            todo, skipped = self.my_shards()
            if not self.on_cuda:
                torch.set_num_threads(1)  # see Perturber._one: the parallelism is across images instead
            stats = self._protect_shards(todo, perturber) if todo else []
        finally:
            perturber.close()
        seconds = time.perf_counter() - start
        timings = {k: round(v, 3) for k, v in self.timer.seconds.items()}
        return RankSummary(self.rank, self.world, len(todo) + skipped, skipped, stats, seconds, timings)

    def _protect_shards(self, todo: list[str], perturber: Perturber) -> list[dict[str, Any]]:
        codec = self.codec
        stream = ProtectStream(
            todo, label_map=self.labels.label_map, max_pixels=self.opts.max_pixels, gpu_jpeg=codec is not None
        )
        expected = sum(self.shard_set.sizes[Path(s).name] for s in todo)
        pool = make_encode_pool(self.encode_backend, self.encoders)
        try:
            items = timed_iter(iter_items(stream, self.workers), self.timer, "wait_input")
            return self._loop(items, pool, perturber, codec, expected)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _loop(
        self,
        items: Iterator[Item | ShardEnd],
        pool: Executor,
        perturber: Perturber,
        codec: GpuCodec | None,
        expected: int,
    ) -> list[dict[str, Any]]:
        """Main thread: group items into batches and run G; the encode pool and one tar-writer thread do the rest.

        Every change to a shard's output goes through the single tar-writer thread, in submission order, so a
        shard's bytes never depend on timing; the main thread waits only when more than ``inflight`` writes are
        outstanding (which bounds memory) and never on fsync.
        """
        writers: dict[str, ShardWriter] = {}
        opened: list[ShardWriter] = []
        buckets: dict[str, SizeBuckets] = {}
        writes: deque[tuple[str, Future]] = deque()
        finished: list[dict[str, Any]] = []
        tar_thread = ThreadPoolExecutor(1, thread_name_prefix="tar-writer")  # one thread: tasks run in order
        show = self.opts.progress and self.rank == 0
        with make_progress(disable=not show) as progress:
            task = progress.add_task(f"protect rank {self.rank}/{self.world}", total=expected)
            t0, done = time.perf_counter(), 0

            def writer_for(shard: str) -> ShardWriter:
                if shard not in writers:  # an empty shard still gets its (empty) tar
                    writers[shard] = self._writer(shard)
                    opened.append(writers[shard])
                return writers[shard]

            def settle(limit: int) -> None:
                """Collect finished writes in order; block on the oldest while more than ``limit`` are outstanding."""
                nonlocal done
                while writes and (len(writes) > limit or writes[0][1].done()):
                    kind, future = writes.popleft()
                    with self.timer("wait_write"):
                        value = future.result()
                    if kind == "end":
                        finished.append(value)
                        continue
                    done += value
                    progress.update(
                        task, completed=done, info=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f} img/s"
                    )
                    if self.delay and kind == "batch":
                        time.sleep(self.delay)

            def submit(writer: ShardWriter, batch: list[Item]) -> None:
                entry = self._submit(batch, pool, perturber, codec)
                writes.append(("batch", tar_thread.submit(self._write_batch, writer, entry)))

            try:
                for item in items:
                    if isinstance(item, ShardEnd):
                        writer = writer_for(item.shard)
                        for batch in buckets.pop(item.shard).drain() if item.shard in buckets else []:
                            submit(writer, batch)
                        writes.append(("end", tar_thread.submit(writers.pop(item.shard).finish)))
                    else:
                        writer = writer_for(item.shard)
                        bad = item.error or self._label_error(item)
                        if bad is not None:
                            writes.append(("bad", tar_thread.submit(writer.quarantine, item.key, bad)))
                            continue
                        for batch in buckets.setdefault(item.shard, SizeBuckets(self.batch_size)).add(item):
                            submit(writer, batch)
                    settle(self.inflight)
                settle(0)
            except BaseException:
                tar_thread.shutdown(wait=True, cancel_futures=True)
                for writer in opened:
                    writer.abort()
                raise
            finally:
                tar_thread.shutdown(wait=True)
        return finished

    def _writer(self, shard: str) -> ShardWriter:
        name = Path(shard).name
        context = {"rank": self.rank, "world_size": self.world, "eps": self.eps, "eps_levels": self.levels}
        context.update(self.spec.describe(), generator_sha256=self.generator_sha)
        return ShardWriter(self.out_dir, name, self.shard_set.sizes[name], context)

    def _label_error(self, item: Item) -> str | None:
        if 0 <= item.label < self.labels.limit:
            return None
        return f"label {item.label} outside the generator's codes 0..{self.labels.limit - 1}"

    def _submit(self, batch: list[Item], pool: Executor, perturber: Perturber, codec: GpuCodec | None) -> PendingBatch:
        """Run G on the batch now and hand the encoding to the pool (it overlaps with the next batch's forward)."""
        shard, rejected = batch[0].shard, []
        with self.timer("forward"):
            batch, originals = self._originals(rejected, batch, codec)
            if not batch:
                return PendingBatch(shard, [], None, [], rejected)
            labels = torch.tensor([it.label for it in batch], dtype=torch.long)
            protected = perturber(originals, labels)
        if codec is not None and codec.encode_on_gpu:
            with self.timer("gpu_codec"):
                results = codec.encode_and_verify(protected, originals)
            if results is not None:
                return PendingBatch(shard, batch, None, results, rejected)
        sources = [it.image for it in batch]
        if any(s is None for s in sources):  # decoded by nvJPEG: the originals live on the GPU only
            sources = list(originals.cpu().numpy())
        host, ready = self._to_host(protected)
        step = max(1, math.ceil(len(batch) / self.encoders))  # one task per encoder keeps them all busy
        futures = []
        for i in range(0, len(batch), step):
            args = (host[i : i + step], sources[i : i + step], self.spec)
            futures.append(
                pool.submit(encode_when_ready, ready, *args) if ready else pool.submit(encode_and_verify, *args)
            )
        return PendingBatch(shard, batch, futures, None, rejected)

    def _to_host(self, protected: torch.Tensor) -> tuple[np.ndarray, Any]:
        """The protected batch as a host array, and a CUDA event the encoders wait on (None if already there).

        With a thread pool the copy is asynchronous, into fresh pinned memory (PyTorch's caching host allocator
        reuses it only once nothing refers to it), so the main thread never waits for the GPU; a process pool
        needs the bytes now."""
        if not self.on_cuda:
            return protected.numpy(), None
        if self.encode_backend == "process":
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
        return len(entry.items) + len(entry.rejected)

    def warn(self, message: str) -> None:
        if self.rank == 0:
            console.print(f"[yellow]warning:[/yellow] {message}")


def refuse_in_place(inp: Path, out: Path) -> None:
    if inp.resolve() == out.resolve():
        raise ValueError(f"--out must differ from --in ({inp}): protect never modifies its input")
