"""Protect's input side: one pass over a rank's shards (decoded in loader workers) and per-shard size buckets.

``ProtectStream`` yields groups of :class:`Item` and ``ShardEnd`` markers; :class:`SizeBuckets` groups one shard's
good items into forward batches of one image size. Both depend on the shard alone, which is what makes output bytes
independent of the number of workers and ranks.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from segue_dist.data.images import BadImage
from segue_dist.data.loader import IMAGE_KEYS, OnePassStream, Record, ShardEnd
from segue_dist.protect.options import MIN_SIDE

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
        self,
        shards: list[str],
        *,
        label_map: dict[str, int] | None,
        max_pixels: int,
        gpu_jpeg: bool = False,
        label_offset: int = 0,
    ) -> None:
        super().__init__(shards, image_size=None, label_map=label_map, keep_raw=True)
        self.max_pixels = max_pixels
        self.label_offset = label_offset
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
        # G's code: the label, numbered after G's training classes for --new-identities (an error record has -1)
        code = record.label + self.label_offset if record.error is None else record.label
        item = Item(record.key, record.shard, code, record.meta, fields, error=record.error)
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


class SizeBuckets:
    """Groups one shard's good items into forward batches of one image size.

    A batch depends on the shard alone (never on what other shards or ranks do), which is what makes output bytes
    independent of the number of workers and ranks. A bucket is emitted when it holds :meth:`capacity` images:
    ``batch_size``, or fewer for large images when ``batch_pixels`` (> 0) caps the pixels per batch (on the CPU a
    batch's activations should fit the caches); when a shard mixes sizes and more than ``batch_size`` images wait
    in all buckets together, the oldest bucket goes early, so memory stays bounded by one batch per open shard.
    """

    def __init__(self, batch_size: int, batch_pixels: int = 0) -> None:
        self.batch_size = batch_size
        self.batch_pixels = batch_pixels
        self.buckets: dict[tuple[int, int], list[Item]] = {}
        self.pending = 0

    def capacity(self, size: tuple[int, int]) -> int:
        """Images per batch for images of ``size`` (height, width): a function of the size alone."""
        if self.batch_pixels <= 0:
            return self.batch_size
        return max(1, min(self.batch_size, self.batch_pixels // (size[0] * size[1])))

    def add(self, item: Item) -> list[list[Item]]:
        bucket = self.buckets.setdefault(item.size, [])
        bucket.append(item)
        self.pending += 1
        ready = []
        if len(bucket) >= self.capacity(item.size):
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
