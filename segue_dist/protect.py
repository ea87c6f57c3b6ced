"""`segue protect`: perturb a whole shard set with a trained Segue generator: sharded, distributed, resumable.

Usage::

    segue protect --generator runs/lfw62/generator.safetensors \\
        --in shards/lfw62/train --out shards/lfw62-protected/train [--labels pseudo_labels.json] \\
        [--format png|jpeg] [--png-level 1] [--jpeg-quality 95] [--batch-size N] [--workers N] [--encode-workers N]

    # the same on several GPUs or nodes: shards are split statically by rank, no collectives are used
    torchrun --nproc_per_node 8 -m segue_dist.protect --generator ... --in ... --out ...
    accelerate launch -m segue_dist.protect --generator ... --in ... --out ...

What it guarantees

* **ε on what is written.** The perturbed image is quantised to uint8 and then clamped *in integers* to
  ``original ± floor(255·ε)`` (8 levels for ε = 8/255), where ``original`` is the decoded input image. Each written
  file is decoded again and compared with the original: for PNG the bound is a checked guarantee
  (``eps_bound_holds: true``), for JPEG the compression error comes on top, so the measured bound is reported
  instead (``eps_bound_holds: null, measured_max_abs: ...``).
* **Nothing lost or duplicated.** Output shard ``NNNNN.tar`` keeps its input shard's name and every sample's key,
  ``.cls`` and ``.json`` (plus a ``"protected"`` entry). A shard is written under a temporary name and renamed, and
  its ``NNNNN._stats.json`` is written last: its presence marks the shard finished. A rerun skips finished shards
  and redoes unfinished ones, so a job killed at any point (``kill -9`` included) finishes on rerun. Once every
  shard is finished, ``sizes.json``, ``labels.json``, ``_quarantine.jsonl`` and finally ``_manifest.json`` are
  written; the manifest balances ``samples_in == samples_out + quarantined`` or the job exits non-zero.
* **Deterministic bytes.** Output bytes depend on the generator, the input shard and the settings only, never on the
  number of ranks, loader or encode workers, or on an interruption: tar members have a fixed mtime, encoders have
  fixed settings, and a shard's images are grouped into forward batches by that shard alone (per size, in shard
  order). On CPU every image is run through G on its own with one intra-op thread, because float32 CPU kernels give
  batch-size- and thread-count-dependent low bits that would flip the odd uint8 rounding; on CUDA (bf16 autocast,
  cuDNN deterministic) results are exact for a given GPU model and ``--batch-size``.
* **Bad samples never stop the job.** Corrupt, truncated, empty, non-image, decompression-bomb, too-small and
  unlabelled samples are quarantined with a one-line reason (per-shard stats, ``_quarantine.jsonl``, manifest);
  CMYK, grayscale, palette and alpha images are converted to RGB by ``decode_image``. Images of different sizes in
  one shard are batched per size.
* **Streaming.** Bounded queues everywhere (loader prefetch, in-flight batches, per-shard size buckets of at most
  ``--batch-size`` images), so memory does not grow with the corpus.

Pipeline (one rank): loader worker processes read and decode the rank's shards (``OnePassStream``, images sent in
groups as HWC numpy arrays) -> the main thread groups each shard's images into forward batches and runs G (CUDA:
bf16 autocast, channels_last, pinned asynchronous copies; CPU: float32, one image per thread) -> an encode pool
(threads for PNG, processes for JPEG) writes each image and decodes it again to check ε, overlapping the next
forward -> one tar-writer thread appends results to each shard's tar in submission order and finishes shards
(fsync, rename, stats), so the main thread waits only when more than ``inflight`` batches are outstanding. With
``--gpu-codec`` (CUDA), plain JPEG inputs are decoded by nvJPEG in batches and JPEG output is encoded and verified
on the GPU; the ε check is then against nvJPEG's decode of the input.

What each output format costs (``bench/protect_throughput.py`` measures it on your machine; the numbers below are
from synthetic 224 px faces stored as JPEG q95, CPU figures in bench/results/protect_throughput_cpu.json):

* ``png`` level 1 (default): lossless, the ε guarantee holds on the file; ~108 KB per protected 224 px image (the
  perturbation is noise-like, so it compresses worse than the clean face) and the slowest encoder.
* ``png`` level 0: lossless, zlib "stored": ~153 KB per image (1.4x), about 2x faster to encode than level 1.
* ``jpeg`` (quality 95, 4:4:4): ~39 KB per image and 6-11x faster to decode + encode than PNG level 1, but
  lossy: the ε bound does not hold on the file (measured max |δ| 20-24 levels against ε = 8, PSNR ~40.6 dB, the
  same PSNR as PNG), so it is reported, not guaranteed.

Where the time goes (a lent H200 + 16 cores, 224 px, default G: width 32, 4 residual blocks): G alone ran 4,500
img/s in bf16; nvJPEG decode + encode ~3,500 img/s; CPU JPEG decode + encode over 16 processes ~3,200 img/s. The job
reached ~1,000 img/s with ``--gpu-codec`` and JPEG output, then limited by the codecs and by that disk (~110 MB/s;
measured before tar writing moved to its own thread). On CPU, G (~13 GFLOP per 224 px image) is the whole cost:
compare a run with G alone, not with the codecs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from segue_dist.checkpoint import file_sha256, label_map_hash, load_generator
from segue_dist.data.images import BadImage, decode_image, encode_jpeg, encode_png
from segue_dist.data.loader import IMAGE_KEYS, OnePassStream, Record, ShardEnd, ShardSet, assign_shards, open_shard_set
from segue_dist.data.sidecar import read_sidecar
from segue_dist.utils import dist
from segue_dist.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from segue_dist.utils.progress import console, make_progress, print_table
from segue_dist.utils.seed import seed_everything

# Fixed tar member mtime, as in `segue shards build`: identical inputs must give byte-identical shards.
TAR_MTIME = 0.0
STATS_SUFFIX = "._stats.json"
MANIFEST_NAME = "_manifest.json"
SETTINGS_NAME = "_protect.json"
QUARANTINE_NAME = "_quarantine.jsonl"
# The generator halves the resolution twice and instance-normalises the bottleneck, so it needs sides >= 8 px.
MIN_SIDE = 8
# PSNR of an image identical to its original is infinite; JSON has no infinity, so it is reported as this.
PSNR_CAP = 100.0
FORMATS = ("png", "jpeg")
# Test hook: seconds to sleep after each written batch, so a test can kill -9 the job in the middle of a shard.
TEST_DELAY_ENV = "SEGUE_PROTECT_TEST_DELAY_S"


# ---------------------------------------------------------------------------------------------------------- options


@dataclass
class ProtectOptions:
    """Everything `segue protect` needs; validated on construction (a bad value is a one-line ``ValueError``)."""

    generator: str
    inp: str
    out: str
    labels: str | None = None  # pseudo-label sidecar (key -> label); None = the shards' `.cls`
    format: str = "png"
    png_level: int = 1
    jpeg_quality: int = 95
    batch_size: int = 0  # images per forward batch (per shard and size); 0 = 256 on CUDA, 16 on CPU
    workers: int = 0  # loader worker processes; 0 = pick from the CPU count
    encode_workers: int = 0  # encode pool size; 0 = pick from the CPU count
    encode_backend: str = "auto"  # thread | process | auto (process for JPEG with >= 4 encoders, else thread)
    threads: int = 0  # CPU only: images run through G in parallel (each on one intra-op thread); 0 = auto
    device: str = "auto"
    gpu_codec: bool = False  # CUDA only: nvJPEG decode of JPEG inputs and, for JPEG output, encode on the GPU
    seed: int = 0
    allow_unseen_labels: bool = False  # labels >= num_classes (up to 2**bits - 1) are legal codes, never trained
    max_pixels: int = 4096 * 4096
    inflight: int = 0  # forward batches whose encode may be pending at once; 0 = 2 x encode workers + 2
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format == "jpg":
            self.format = "jpeg"
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"png_level must be in 0..9, got {self.png_level}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        for name in ("batch_size", "workers", "encode_workers", "threads", "inflight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        if self.encode_backend not in ("auto", "thread", "process"):
            raise ValueError(f"encode_backend must be auto, thread or process, got {self.encode_backend!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_pixels < MIN_SIDE * MIN_SIDE:
            raise ValueError(f"max_pixels must be >= {MIN_SIDE * MIN_SIDE}, got {self.max_pixels}")
        if not self.generator or not self.inp or not self.out:
            raise ValueError("protect needs --generator, --in and --out")


def cpus_per_rank() -> int:
    """CPU cores this process may use, shared evenly with the other ranks on the same node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local_world))


def resolve_workers(opts: ProtectOptions, on_cuda: bool) -> tuple[int, int, int]:
    """(loader workers, encode workers, CPU G threads). Explicit values win; 0 means pick from the cores.

    On CPU, G costs 10-50x more than decode + encode (bench/protect_throughput.py), so every core runs G and the
    codec workers, mostly idle, share them. On a GPU host the cores are all for codecs: about a third decode (JPEG
    decode is cheaper than encode + the verifying decode), the rest encode.
    """
    cores = cpus_per_rank()
    if on_cuda:
        workers = opts.workers or max(1, cores // 3)
        encoders = opts.encode_workers or max(1, cores - workers - 1)
        return workers, encoders, 1
    threads = opts.threads or cores
    workers = opts.workers or max(1, cores // 4)
    encoders = opts.encode_workers or max(1, cores // 2)
    return workers, encoders, threads


def resolve_encode_backend(choice: str, fmt: str, encoders: int) -> str:
    """PIL's zlib releases the GIL, so PNG encodes well in threads; its JPEG path mostly does not (16 threads ran
    decode + encode 4x slower than 16 processes on a 16-core host), so several JPEG encoders are processes."""
    if choice != "auto":
        return choice
    return "process" if fmt == "jpeg" and encoders >= 4 else "thread"


def resolve_batch_size(opts: ProtectOptions, on_cuda: bool) -> int:
    """Big batches feed a GPU; on CPU images go through G one by one anyway, and small batches start encoding
    sooner (and bound memory tighter)."""
    return opts.batch_size or (256 if on_cuda else 16)


def eps_levels(eps: float) -> int:
    """ε in uint8 levels: floor(255·ε), never above ε (equals round(255·ε) for the usual ε = k/255)."""
    return int(math.floor(255.0 * eps + 1e-6))


# ------------------------------------------------------------------------------------------------ pure tensor parts


def quantise_protected(original: torch.Tensor, delta: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 protected images from uint8 originals and G's float delta (in [0, 1] units), any shape.

    Rounding ``original + 255·delta`` alone could land half a level past ε; the clamp on integer values to
    ``original ± levels`` makes ``|protected - original| <= levels`` exact, whatever G or rounding did.
    """
    base = original.to(torch.float32)
    rounded = torch.round(base + delta.to(torch.float32) * 255.0)
    clamped = torch.minimum(torch.maximum(rounded, base - levels), base + levels)
    return clamped.clamp_(0.0, 255.0).to(torch.uint8)


@dataclass
class ImageCheck:
    """What the written file measures against its original, in uint8 levels (1/255 units)."""

    max_abs: int
    mean_abs: float
    psnr: float


def measure(written: np.ndarray, original: np.ndarray) -> ImageCheck:
    diff = written.astype(np.int16) - original.astype(np.int16)
    absdiff = np.abs(diff)
    mse = float(np.mean(diff.astype(np.float32) ** 2))
    psnr = PSNR_CAP if mse == 0.0 else min(PSNR_CAP, 10.0 * math.log10(255.0**2 / mse))
    return ImageCheck(int(absdiff.max()), float(absdiff.mean()), psnr)


# -------------------------------------------------------------------------------------------------- encode + verify


@dataclass(frozen=True)
class EncodeSpec:
    format: str
    png_level: int
    jpeg_quality: int
    levels: int

    @property
    def extension(self) -> str:
        return "png" if self.format == "png" else "jpg"

    def describe(self) -> dict[str, Any]:
        setting = {"png_level": self.png_level} if self.format == "png" else {"jpeg_quality": self.jpeg_quality}
        return {"format": self.format, **setting}


@dataclass
class EncodedImage:
    """One encoded image and its check; ``error`` set (and ``data`` None) when it must be quarantined."""

    data: bytes | None
    check: ImageCheck | None
    error: str | None = None


def encode_image(protected: np.ndarray, spec: EncodeSpec) -> bytes:
    if spec.format == "png":
        return encode_png(protected, compress_level=spec.png_level)
    return encode_jpeg(protected, quality=spec.jpeg_quality)


def encode_and_verify(protected: np.ndarray, original: Sequence[np.ndarray], spec: EncodeSpec) -> list[EncodedImage]:
    """Encode (N, H, W, 3) uint8 images, decode each file again and measure it against the original.

    Runs in the encode pool (threads or processes: PIL releases the GIL while it compresses). The check is made
    on the decoded bytes, i.e. on exactly what a user of the protected set will load.
    """
    results = []
    for image, source in zip(protected, original, strict=True):
        data = encode_image(np.ascontiguousarray(image), spec)
        try:
            written = np.asarray(decode_image(data), dtype=np.uint8)
        except BadImage as exc:  # an encoder bug, not bad input: keep going, but never write the file
            results.append(EncodedImage(None, None, f"written image does not decode: {exc}"))
            continue
        check = measure(written, source)
        if spec.format == "png" and (not np.array_equal(written, image) or check.max_abs > spec.levels):
            # Cannot happen with the integer clamp and a lossless codec; if it ever does, it is not written.
            results.append(EncodedImage(None, check, f"eps bound violated after encoding: {check.max_abs} levels"))
            continue
        results.append(EncodedImage(data, check))
    return results


def _pool_initializer() -> None:
    # Encoders must not fight the main thread (G) for cores with torch's own thread pool.
    torch.set_num_threads(1)


def make_encode_pool(backend: str, workers: int) -> Executor:
    if backend == "process":
        # spawn, not fork: forking a process that already runs torch and loader threads can deadlock.
        return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_pool_initializer)
    return ThreadPoolExecutor(workers, thread_name_prefix="encode")


# ---------------------------------------------------------------------------------------------------- input stream


SHARD_ERROR_SUFFIX = ":__shard_error__"
PASSTHROUGH_SKIP = {*IMAGE_KEYS, "json"}
# Items per message from a loader worker: one pickle per group instead of per image keeps the IPC cheap.
GROUP = 32


@dataclass
class Item:
    """One sample on its way through protect.

    Images travel between processes as HWC uint8 numpy arrays, pickled inline in the worker's message: a torch
    tensor would cost a shared-memory segment and a file-descriptor handshake per image. HWC is also what the
    encoders take and, seen as NCHW, the channels_last layout the GPU wants, so no copy transposes it.
    """

    key: str
    shard: str
    label: int
    meta: Any
    fields: dict[str, Any]  # raw fields copied unchanged to the output (`.cls`, captions, ...)
    size: tuple[int, int] = (0, 0)  # (height, width)
    image: np.ndarray | None = None  # decoded HWC uint8
    jpeg: bytes | None = None  # undecoded, for nvJPEG (--gpu-codec)
    error: str | None = None

    @property
    def is_shard_error(self) -> bool:
        return self.key.endswith(SHARD_ERROR_SUFFIX)


class ProtectStream(OnePassStream):
    """One pass over a rank's shards in groups of items, with protect's checks done in the loader workers.

    Decoding goes through `OnePassStream` (so through ``decode_image``: CMYK, gray, palette and alpha become RGB,
    anything undecodable becomes a reason). With ``gpu_jpeg`` plain RGB/gray JPEGs are not decoded here: their bytes
    travel instead and are decoded in batches by nvJPEG on the GPU.
    """

    def __init__(
        self, shards: list[str], *, label_map: dict[str, int] | None, max_pixels: int, gpu_jpeg: bool = False
    ) -> None:
        super().__init__(shards, image_size=None, label_map=label_map, keep_raw=True)
        self.max_pixels = max_pixels
        self.gpu_jpeg = gpu_jpeg

    def __iter__(self) -> Iterator[list[Item | ShardEnd]]:  # type: ignore[override]
        group: list[Item | ShardEnd] = []
        for entry in super().__iter__():
            group.append(entry if isinstance(entry, ShardEnd) else self._item(entry))
            if isinstance(entry, ShardEnd) or len(group) >= GROUP:
                yield group
                group = []
        if group:
            yield group

    def _record(self, shard: str, raw: dict[str, Any]) -> Record:
        if self.gpu_jpeg:
            record = self._jpeg_record(shard, raw)
            if record is not None:
                return record
        record = super()._record(shard, raw)
        record.raw = {"fields": _passthrough(raw)}
        return record

    def _item(self, record: Record) -> Item:
        fields = record.raw["fields"] if record.raw else {}
        item = Item(record.key, record.shard, record.label, record.meta, fields, error=record.error)
        if record.error is not None:
            return item
        if record.image is not None:
            item.image = record.image.permute(1, 2, 0).numpy()  # the HWC array decode made (a view, no copy)
            item.size = (item.image.shape[0], item.image.shape[1])
        else:
            assert record.raw is not None
            item.jpeg, item.size = record.raw["jpeg"], record.raw["size"]
        height, width = item.size
        if min(height, width) < MIN_SIDE:
            item.error = f"too small: {width}x{height} (the generator needs sides >= {MIN_SIDE} px)"
        elif height * width > self.max_pixels:
            item.error = f"too large: {width}x{height} exceeds --max-pixels {self.max_pixels}"
        if item.error is not None:
            item.image = item.jpeg = None
        return item

    def _jpeg_record(self, shard: str, raw: dict[str, Any]) -> Record | None:
        """A record carrying undecoded JPEG bytes, or None when the sample needs the careful CPU decode."""
        data = raw.get("jpg", raw.get("jpeg"))
        if not data or data[:3] != b"\xff\xd8\xff" or "__error__" in raw:
            return None
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only: cheap
                mode, (width, height) = img.mode, img.size
                orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - anything odd goes to the CPU path, which gives the reason
            return None
        # CMYK and friends need decode_image's conversion, and EXIF-rotated photos its uprighting (nvJPEG would
        # hand back the pixels as stored): both take the CPU path.
        if mode not in ("RGB", "L") or orientation not in (None, 1):
            return None
        meta, fields = _parse_meta(raw), _passthrough(raw)
        try:
            label = self._label(raw)
        except BadImage as exc:
            return Record(raw.get("__key__", ""), shard, None, -1, meta, str(exc), {"fields": fields})
        return Record(
            raw["__key__"], shard, None, label, meta, None, {"fields": fields, "jpeg": data, "size": (height, width)}
        )

    def _label(self, raw: dict[str, Any]) -> int:
        key = raw["__key__"]
        if self.label_map is not None:
            if key not in self.label_map:
                raise BadImage(f"key {key} has no pseudo-label in the sidecar")
            return int(self.label_map[key])
        try:
            return int(raw["cls"])
        except (KeyError, ValueError):
            raise BadImage("missing or non-integer .cls label") from None


def _passthrough(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw fields copied unchanged to the output: everything but the image, the json and loader internals."""
    return {k: v for k, v in raw.items() if not k.startswith("__") and k not in PASSTHROUGH_SKIP}


def _parse_meta(raw: dict[str, Any]) -> Any:
    try:
        return json.loads(raw.get("json", b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return {}


def iter_items(stream: ProtectStream, workers: int) -> Iterator[Item | ShardEnd]:
    """Items one by one, decoded in ``workers`` processes; the DataLoader's bounded prefetch keeps memory flat."""
    from torch.utils.data import DataLoader

    workers = min(workers, len(stream.shards))
    groups: Iterator[list[Item | ShardEnd]]
    if workers == 0:
        groups = iter(stream)
    else:
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity, prefetch_factor=4)
        groups = iter(loader)
    for group in groups:
        yield from group


def _identity(x: Any) -> Any:
    return x


# ----------------------------------------------------------------------------------------------- per-shard batching


class SizeBuckets:
    """Groups one shard's good items into forward batches of one image size.

    A batch depends on the shard alone (never on what other shards or ranks do), which is what makes output bytes
    independent of the number of workers and ranks. A bucket is emitted when it holds ``batch_size`` images; when a
    shard mixes sizes and more than ``batch_size`` images wait in all buckets together, the oldest bucket goes
    early, so memory stays bounded by one batch per open shard.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.buckets: dict[tuple[int, int], list[Item]] = {}
        self.pending = 0

    def add(self, item: Item) -> list[list[Item]]:
        bucket = self.buckets.setdefault(item.size, [])
        bucket.append(item)
        self.pending += 1
        ready = []
        if len(bucket) >= self.batch_size:
            ready.append(self._pop(item.size))
        if self.pending > self.batch_size:
            ready.append(self._pop(next(iter(self.buckets))))
        return ready

    def drain(self) -> list[list[Item]]:
        return [self._pop(size) for size in list(self.buckets)]

    def _pop(self, size: tuple[int, int]) -> list[Item]:
        batch = self.buckets.pop(size)
        self.pending -= len(batch)
        return batch


# ------------------------------------------------------------------------------------------------------ shard output


def stats_path(out_dir: Path, shard_name: str) -> Path:
    return out_dir / shard_name.replace(".tar", STATS_SUFFIX)


def shard_is_finished(out_dir: Path, shard_name: str) -> bool:
    return (out_dir / shard_name).is_file() and stats_path(out_dir, shard_name).is_file()


def remove_shard_temps(out_dir: Path, shard_name: str) -> int:
    """Delete temporaries a killed run left for this shard (tar and stats), and only this shard's: other ranks may be
    writing their own shards' temporaries in the same folder right now."""
    stem = shard_name[: -len(".tar")] if shard_name.endswith(".tar") else shard_name
    removed = 0
    for pattern in (f".{shard_name}.*.tmp", f".{stem}{STATS_SUFFIX}.*.tmp"):
        for tmp in out_dir.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class ShardWriter:
    """One output shard: a tar written under a temporary name, renamed into place and then its stats written."""

    def __init__(self, out_dir: Path, name: str, expected: int, context: dict[str, Any]) -> None:
        self.out_dir, self.name, self.expected = out_dir, name, expected
        self.context = context  # settings and rank, copied into the stats
        self.started = time.perf_counter()
        self.read = 0
        self.written = 0
        self.quarantined: list[dict[str, str]] = []
        self.shard_errors: list[str] = []
        self.max_abs = 0
        self.sum_mean_abs = 0.0
        self.sum_psnr = 0.0
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shard set is meant to be read by others
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "wb")
        self.tar = wds.TarWriter(self.fh, mtime=TAR_MTIME, encoder=False)
        self.closed = False

    def quarantine(self, key: str, reason: str) -> int:
        """Record a sample that is not written; returns the number of samples it accounts for (0 for a tar fault)."""
        if key.endswith(SHARD_ERROR_SUFFIX):
            self.shard_errors.append(reason)  # a tar fault, not a sample: the balance check catches what it lost
            return 0
        self.read += 1
        self.quarantined.append({"key": key, "reason": reason})
        return 1

    def write(self, sample: dict[str, Any], check: ImageCheck) -> None:
        self.tar.write(sample)
        self.read += 1
        self.written += 1
        self.max_abs = max(self.max_abs, check.max_abs)
        self.sum_mean_abs += check.mean_abs
        self.sum_psnr += check.psnr

    def finish(self) -> dict[str, Any]:
        """Close, fsync and rename the tar, then write the stats (last: they mark the shard finished)."""
        self.tar.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.out_dir / self.name)
        self.closed = True
        stats = self.stats()
        atomic_write_json(stats_path(self.out_dir, self.name), stats)
        return stats

    def abort(self) -> None:
        if self.closed:
            return
        with contextlib.suppress(Exception):
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def stats(self) -> dict[str, Any]:
        n = max(self.written, 1)
        lossless = self.context["format"] == "png"
        return {
            "shard": self.name,
            **self.context,
            "expected": self.expected,
            "read": self.read,
            "written": self.written,
            "quarantined": len(self.quarantined),
            "quarantined_samples": self.quarantined,
            "shard_errors": self.shard_errors,
            "max_abs_delta": self.max_abs,
            "mean_abs_delta": round(self.sum_mean_abs / n, 4),
            "psnr_mean": round(self.sum_psnr / n, 3),
            "eps_bound_holds": (self.max_abs <= self.context["eps_levels"]) if lossless else None,
            "measured_max_abs": self.max_abs,
            "seconds": round(time.perf_counter() - self.started, 3),
        }


def output_sample(item: Item, data: bytes, ext: str, protected_info: dict[str, Any]) -> dict[str, Any]:
    """The sample written for a protected item: same key, `.cls` and other fields, new image, json + provenance."""
    meta = item.meta if isinstance(item.meta, dict) else {"meta": item.meta}
    meta = {**meta, "protected": {**protected_info, "label": int(item.label)}}
    sample: dict[str, Any] = {"__key__": item.key, **item.fields, ext: data}
    sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sample


# --------------------------------------------------------------------------------------------------------- settings


def protect_settings(
    opts: ProtectOptions, gen_meta: dict[str, Any], generator_sha: str, eps: float, compute: str, batch_size: int
) -> dict[str, Any]:
    """What the output bytes depend on; recorded in `_protect.json` and checked when a run resumes."""
    spec = {"png_level": opts.png_level} if opts.format == "png" else {"jpeg_quality": opts.jpeg_quality}
    labels = "cls" if opts.labels is None else f"sidecar:{file_sha256(_sidecar_file(opts.labels))}"
    return {
        "generator_sha256": generator_sha,
        "eps": eps,
        "eps_levels": eps_levels(eps),
        "format": opts.format,
        **spec,
        "labels": labels,
        "compute": compute,
        # On CPU every image goes through G alone, so the batch size cannot change a byte.
        "batch_size": batch_size if compute.startswith("cuda") else None,
        "generator_num_classes": int(gen_meta.get("num_classes", 0)),
    }


# Keys whose change would make one output set mix two different protections: a resume refuses them.
SETTINGS_MUST_MATCH = ("generator_sha256", "eps", "format", "png_level", "jpeg_quality", "labels")
# Keys whose change keeps the protection valid but may flip the odd uint8 rounding: a resume warns.
SETTINGS_SHOULD_MATCH = ("compute", "batch_size")


def check_or_record_settings(out_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Record the settings on a first run; on a resume, refuse incompatible ones. Returns warnings."""
    path = out_dir / SETTINGS_NAME
    if not path.is_file():
        if any(out_dir.glob("*.tar")):
            raise ValueError(f"{out_dir} holds .tar shards not written by segue protect; choose an empty --out")
        atomic_write_json(path, settings)  # every rank writes the same content: the race is harmless
        return []
    previous = read_json(path)
    for key in SETTINGS_MUST_MATCH:
        if previous.get(key) != settings.get(key):
            raise ValueError(
                f"{out_dir} was started with {key}={previous.get(key)!r}, this run has {settings.get(key)!r}; "
                f"resume with the same settings or choose a new --out"
            )
    return [
        f"{key} differs from the run that started {out_dir} ({previous.get(key)!r} -> {settings.get(key)!r}): "
        f"shards written now may differ in the odd uint8 rounding from an uninterrupted run"
        for key in SETTINGS_SHOULD_MATCH
        if previous.get(key) != settings.get(key)
    ]


def _sidecar_file(path: str) -> Path:
    p = Path(path)
    return p / "pseudo_labels.json" if p.is_dir() else p


# ----------------------------------------------------------------------------------------------------------- labels


@dataclass
class LabelPlan:
    label_map: dict[str, int] | None  # None = use `.cls`
    limit: int  # labels must be in [0, limit)
    warnings: list[str] = field(default_factory=list)


def plan_labels(opts: ProtectOptions, shard_set: ShardSet, gen_meta: dict[str, Any], gen_cfg: Any) -> LabelPlan:
    """Where G's side information comes from, and a clear error if the generator cannot code those labels."""
    num_classes, bits = int(gen_cfg.num_classes), int(gen_cfg.bits)
    limit = 2**bits if opts.allow_unseen_labels else num_classes
    hint = "" if opts.allow_unseen_labels else f" (--allow-unseen-labels accepts labels up to {2**bits - 1})"
    warnings_: list[str] = []
    if opts.labels is not None:
        label_map, k = read_sidecar(opts.labels)
        if k > limit:
            raise ValueError(f"sidecar {opts.labels} has K={k} pseudo-labels but the generator codes {limit}{hint}")
        return LabelPlan(label_map, limit, warnings_)
    if shard_set.labels:
        top = max(shard_set.labels.values())
        if top >= limit:
            raise ValueError(
                f"{shard_set.root}/labels.json has labels up to {top} but the generator codes only {limit}{hint}"
            )
        trained_hash = gen_meta.get("label_map_sha256", "")
        if (
            trained_hash
            and gen_meta.get("label_source", "cls") == "cls"
            and trained_hash != label_map_hash(shard_set.labels)
        ):
            warnings_.append(
                "the generator was trained with a different label map than this shard set's labels.json: labels "
                "just index codes, so this works, but identity i gets the code identity i had in training"
            )
    return LabelPlan(None, limit, warnings_)


# ---------------------------------------------------------------------------------------------------------- compute


class Perturber:
    """Runs G on a batch of same-size uint8 images (N, H, W, 3) and returns the protected uint8 images (N, H, W, 3)
    on the device it computed on."""

    def __init__(self, generator: torch.nn.Module, device: torch.device, levels: int, threads: int) -> None:
        self.generator = generator
        self.device = device
        self.levels = levels
        self.on_cuda = device.type == "cuda"
        self.pool = None if self.on_cuda or threads <= 1 else make_thread_pool(threads, "generator")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def compute_label(self) -> str:
        if self.on_cuda:
            return f"cuda-bf16:{torch.cuda.get_device_name(self.device)}"
        return "cpu-fp32-per-image"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return self._cuda(images, labels)
        if self.pool is None:
            deltas = [self._one(images[i : i + 1], labels[i : i + 1]) for i in range(len(images))]
        else:
            deltas = list(self.pool.map(lambda i: self._one(images[i : i + 1], labels[i : i + 1]), range(len(images))))
        return quantise_protected(images, torch.cat(deltas).permute(0, 2, 3, 1), self.levels).contiguous()

    def _one(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # One image at a time on one intra-op thread: float32 CPU kernels then give the same bits whatever the
        # batch, the number of threads or ranks (batched GEMMs and thread splits change the low bits).
        with torch.inference_mode():
            return self.generator(image.permute(0, 3, 1, 2).to(torch.float32).div_(255.0), label)

    def _cuda(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Asynchronous: nothing here waits for the GPU, so the main thread goes on to the next batch.
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                # NHWC memory seen as NCHW is channels_last: the layout cuDNN's fast kernels want, without a copy.
                delta = self.generator(images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0), labels)
            return quantise_protected(images, delta.float().permute(0, 2, 3, 1), self.levels).contiguous()


def make_thread_pool(threads: int, name: str) -> ThreadPoolExecutor:
    # torch.set_num_threads is per thread: each pool thread must be told to use one intra-op thread itself.
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {choice} asked for, but CUDA is not available here")
        return torch.device(choice) if ":" in choice else dist.best_device()
    return dist.best_device()


def encode_when_ready(
    ready: Any, protected: np.ndarray, original: Sequence[np.ndarray], spec: EncodeSpec
) -> list[EncodedImage]:
    """`encode_and_verify` once the GPU->host copy of ``protected`` has landed (``ready``: a CUDA event)."""
    ready.synchronize()  # releases the GIL while it waits
    return encode_and_verify(protected, original, spec)


# ------------------------------------------------------------------------------------------------------ GPU codecs


class GpuCodec:
    """nvJPEG through torchvision: batched decode of JPEG inputs and, for JPEG output, encode + verify on the GPU.

    Optional and defensive: a batched decode that fails is retried image by image and then on the CPU, and if GPU
    encoding is unavailable the CPU encode pool takes over, so an odd file or torchvision build never stops the job.
    The ε check is then made against nvJPEG's decode of the input, which may differ from libjpeg's by a level.
    """

    def __init__(self, device: torch.device, spec: EncodeSpec) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        # torchvision >= 0.29 deprecates its codecs in favour of TorchCodec; they still work, and say so per call.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        self.device, self.spec = device, spec
        self.decode_jpeg, self.encode_jpeg, self.rgb = decode_jpeg, encode_jpeg, ImageReadMode.RGB
        self.encode_on_gpu = spec.format == "jpeg"

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """CHW uint8 CUDA tensors (None where nvJPEG refuses a file)."""
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(self.decode_jpeg(tensors, mode=self.rgb, device=self.device))
        except Exception:  # noqa: BLE001 - one bad file fails the whole batched call: retry one by one
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(self.decode_jpeg(t, mode=self.rgb, device=self.device))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out

    def encode_and_verify(self, protected: torch.Tensor, original: torch.Tensor) -> list[EncodedImage] | None:
        """JPEG-encode (N, H, W, 3) uint8 CUDA images and measure the decoded files against the originals; None if
        this torchvision cannot encode on the GPU (the caller then encodes on the CPU from now on)."""
        chw = protected.permute(0, 3, 1, 2).contiguous()
        try:
            encoded = [e.cpu() for e in self.encode_jpeg(list(chw), quality=self.spec.jpeg_quality)]
        except Exception:  # noqa: BLE001
            self.encode_on_gpu = False
            return None
        written = torch.stack(list(self.decode_jpeg(encoded, mode=self.rgb, device=self.device)))
        diff = written.to(torch.int16) - original.permute(0, 3, 1, 2).to(torch.int16)
        absdiff = diff.abs().flatten(1)
        max_abs = absdiff.amax(1).tolist()
        mean_abs = absdiff.float().mean(1).tolist()
        mse = diff.float().pow(2).flatten(1).mean(1).tolist()
        out = []
        for blob, m, a, e in zip(encoded, max_abs, mean_abs, mse, strict=True):
            psnr = PSNR_CAP if e == 0 else min(PSNR_CAP, 10.0 * math.log10(255.0**2 / e))
            out.append(EncodedImage(blob.numpy().tobytes(), ImageCheck(int(m), float(a), psnr)))
        return out


# ------------------------------------------------------------------------------------------------------ the protector


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
        self.generator.eval()
        if self.on_cuda:
            self.generator = self.generator.to(memory_format=torch.channels_last)
        cfg = self.generator.config  # type: ignore[attr-defined]
        self.eps = float(cfg.eps)
        self.levels = eps_levels(self.eps)
        self.generator_sha = self.gen_meta.get("weights_sha256") or file_sha256(_weights_file(opts.generator))
        self.labels = plan_labels(opts, self.shard_set, self.gen_meta, cfg)
        self.spec = EncodeSpec(opts.format, opts.png_level, opts.jpeg_quality, self.levels)
        self.workers, self.encoders, self.threads = resolve_workers(opts, self.on_cuda)
        self.batch_size = resolve_batch_size(opts, self.on_cuda)
        self.inflight = opts.inflight or 2 * self.encoders + 2
        self.encode_backend = resolve_encode_backend(opts.encode_backend, opts.format, self.encoders)
        self.protected_info = {"generator_sha256": self.generator_sha, "eps": self.eps, **self.spec.describe()}
        self.protected_info["label_source"] = "cls" if opts.labels is None else "sidecar"
        self.delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
        self.timer = PhaseTimer()

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
        todo = [s for s in mine if not shard_is_finished(self.out_dir, Path(s).name)]
        for shard in todo:
            remove_shard_temps(self.out_dir, Path(shard).name)
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
        codec = GpuCodec(self.device, self.spec) if self.opts.gpu_codec else None
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


def _weights_file(path: str) -> Path:
    p = Path(path)
    return p / "generator.safetensors" if p.is_dir() else p


# --------------------------------------------------------------------------------------------------------- manifest


def collect_finished(in_set: ShardSet, out_dir: Path) -> list[dict[str, Any]] | None:
    """Every input shard's output stats, or None while some shard is not finished yet."""
    names = [Path(s).name for s in in_set.shards]
    if not all(shard_is_finished(out_dir, name) for name in names):
        return None
    return [read_json(stats_path(out_dir, name)) for name in names]


def build_manifest(in_set: ShardSet, out_dir: Path, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over all shards and the balance check; deterministic content, so any rank may (re)write it."""
    samples_in = sum(in_set.sizes[s["shard"]] for s in stats)
    samples_read = sum(s["read"] for s in stats)
    samples_out = sum(s["written"] for s in stats)
    quarantined = [{"shard": s["shard"], **q} for s in stats for q in s["quarantined_samples"]]
    shard_errors = [{"shard": s["shard"], "reason": e} for s in stats for e in s["shard_errors"]]
    problems = []
    if samples_in != samples_out + len(quarantined):
        problems.append(
            f"samples in ({samples_in}) != samples out ({samples_out}) + quarantined ({len(quarantined)}): "
            f"{samples_in - samples_out - len(quarantined)} samples unaccounted for"
        )
    for s in stats:
        if in_set.sizes[s["shard"]] != s["written"] + s["quarantined"]:
            problems.append(f"{s['shard']}: sizes.json says {in_set.sizes[s['shard']]}, read {s['read']}")
    written = [s for s in stats if s["written"]]
    n = max(samples_out, 1)
    first = stats[0] if stats else {}
    lossless = first.get("format") == "png"
    max_abs = max((s["max_abs_delta"] for s in written), default=0)
    return {
        "input": str(in_set.root),
        "output": str(out_dir),
        "generator_sha256": first.get("generator_sha256"),
        "eps": first.get("eps"),
        "eps_levels": first.get("eps_levels"),
        "format": first.get("format"),
        **({"png_level": first["png_level"]} if "png_level" in first else {}),
        **({"jpeg_quality": first["jpeg_quality"]} if "jpeg_quality" in first else {}),
        "shards": len(stats),
        "samples_in": samples_in,
        "samples_read": samples_read,
        "samples_out": samples_out,
        "quarantined": len(quarantined),
        "balanced": not problems,
        "problems": problems,
        "eps_bound_holds": all(s["eps_bound_holds"] for s in stats) if lossless else None,
        "measured_max_abs": max_abs,
        "max_abs_delta": max_abs,
        "mean_abs_delta": round(sum(s["mean_abs_delta"] * s["written"] for s in written) / n, 4),
        "psnr_mean": round(sum(s["psnr_mean"] * s["written"] for s in written) / n, 3),
        "quarantined_samples": quarantined,
        "shard_errors": shard_errors,
        "written_by_rank": {str(s["shard"]): s["rank"] for s in stats},
    }


def finalize_if_complete(in_set: ShardSet, out_dir: Path) -> dict[str, Any] | None:
    """If every shard is finished, write sizes.json, _quarantine.jsonl and (last) _manifest.json; else None.

    Every rank calls this after its own shards. Without collectives nobody knows who finishes last, but whoever
    does sees all stats; two ranks finishing together write identical files atomically, which is harmless.
    """
    stats = collect_finished(in_set, out_dir)
    if stats is None:
        return None
    manifest = build_manifest(in_set, out_dir, stats)
    atomic_write_json(out_dir / "sizes.json", {s["shard"]: s["written"] for s in stats})
    lines = [json.dumps(q, ensure_ascii=False, sort_keys=True) for q in manifest["quarantined_samples"]]
    atomic_write_text(out_dir / QUARANTINE_NAME, "".join(line + "\n" for line in lines))
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------- report


def print_rank_summary(summary: RankSummary) -> None:
    stats = summary.stats
    written = summary.written
    rate = written / summary.seconds if summary.seconds > 0 else 0.0
    rows = [
        [
            f"{summary.rank}/{summary.world_size}",
            f"{len(stats)}+{summary.shards_skipped}",
            str(written),
            str(summary.quarantined),
            str(max((s["max_abs_delta"] for s in stats if s["written"]), default=0)),
            f"{sum(s['mean_abs_delta'] * s['written'] for s in stats) / max(written, 1):.2f}",
            f"{sum(s['psnr_mean'] * s['written'] for s in stats) / max(written, 1):.2f}",
            f"{rate:,.1f}",
        ]
    ]
    if summary.timings:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(summary.timings.items(), key=lambda kv: -kv[1]))
        console.print(f"main thread: {phases} of {summary.seconds:.1f}s")
    print_table(
        "segue protect: this rank (shards done now + already finished; |δ| in 1/255)",
        ["rank", "shards", "written", "quar.", "max|δ|", "mean|δ|", "PSNR", "img/s"],
        rows,
    )


def print_manifest(manifest: dict[str, Any]) -> None:
    bound = manifest["eps_bound_holds"]
    bound_text = "n/a (lossy: measured)" if bound is None else ("holds" if bound else "VIOLATED")
    rows = [
        ["shards", str(manifest["shards"])],
        ["samples in", str(manifest["samples_in"])],
        ["samples out", str(manifest["samples_out"])],
        ["quarantined", str(manifest["quarantined"])],
        ["balanced", "yes" if manifest["balanced"] else "NO"],
        [f"ε bound ({manifest['eps_levels']} levels)", bound_text],
        ["max |δ| (levels)", str(manifest["measured_max_abs"])],
        ["mean |δ| (levels)", f"{manifest['mean_abs_delta']:.2f}"],
        ["PSNR (dB)", f"{manifest['psnr_mean']:.2f}"],
    ]
    print_table(f"segue protect: {manifest['output']}", ["", "value"], rows)
    for q in manifest["quarantined_samples"][:20]:
        console.print(f"  quarantined {q['shard']} {q['key']}: {q['reason']}")
    if manifest["quarantined"] > 20:
        console.print(f"  ... {manifest['quarantined'] - 20} more in {QUARANTINE_NAME}")
    for e in manifest["shard_errors"]:
        console.print(f"  [red]shard error[/red] {e['shard']}: {e['reason']}")


# -------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, metavar="PATH", help="exported generator (.safetensors or dir)")
    parser.add_argument("--in", dest="inp", required=True, metavar="DIR", help="input split, e.g. shards/lfw62/train")
    parser.add_argument("--out", required=True, metavar="DIR", help="output split folder (must differ from --in)")
    parser.add_argument("--labels", metavar="JSON", help="pseudo-label sidecar (key -> label) instead of .cls")
    parser.add_argument("--format", choices=["png", "jpeg", "jpg"], default="png", help="output format (png)")
    parser.add_argument("--png-level", type=int, default=1, help="PNG zlib level 0..9 (1; 0 = fastest, largest)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1..100 (95)")
    parser.add_argument("--batch-size", type=int, default=0, help="forward batch (0 = 256 on CUDA, 16 on CPU)")
    parser.add_argument("--workers", type=int, default=0, help="loader (decode) worker processes (0 = auto)")
    parser.add_argument("--encode-workers", type=int, default=0, help="encode pool size (0 = auto)")
    parser.add_argument(
        "--encode-backend", choices=["auto", "thread", "process"], default="auto", help="encode pool kind (auto)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU only: images through G in parallel (0 = auto)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    parser.add_argument("--gpu-codec", action="store_true", help="CUDA: nvJPEG decode of JPEG inputs, GPU JPEG encode")
    parser.add_argument("--allow-unseen-labels", action="store_true", help="accept labels >= the generator's classes")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="quarantine larger images (4096x4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> ProtectOptions:
    return ProtectOptions(
        generator=args.generator,
        inp=args.inp,
        out=args.out,
        labels=args.labels,
        format=args.format,
        png_level=args.png_level,
        jpeg_quality=args.jpeg_quality,
        batch_size=args.batch_size,
        workers=args.workers,
        encode_workers=args.encode_workers,
        encode_backend=args.encode_backend,
        threads=args.threads,
        device=args.device,
        gpu_codec=args.gpu_codec,
        seed=args.seed,
        allow_unseen_labels=args.allow_unseen_labels,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
    )


def protect(opts: ProtectOptions) -> tuple[RankSummary, dict[str, Any] | None]:
    """Run this rank's share; returns its summary and the manifest if this rank completed the set."""
    seed_everything(opts.seed)
    protector = Protector(opts)
    summary = protector.run()
    manifest = finalize_if_complete(protector.shard_set, protector.out_dir)
    return summary, manifest


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    summary, manifest = protect(opts)
    is_main = summary.rank == 0
    if is_main or manifest is not None:
        print_rank_summary(summary)
    if manifest is None:
        console.print(
            f"rank {summary.rank}: shards done; the manifest is written by the last rank to finish "
            f"(or by a rerun, which skips finished shards)"
        )
        return 0
    print_manifest(manifest)
    if not manifest["balanced"]:
        print(f"segue protect: error: {opts.out}: " + "; ".join(manifest["problems"]), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from segue_dist.cli import stage_main

    return stage_main("protect", argv)


if __name__ == "__main__":
    sys.exit(main())
