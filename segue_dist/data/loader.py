"""WebDataset pipelines over shard sets.

Two modes:

* **training** (`TrainStream`): shards are resampled with a seed derived from (seed, epoch, rank, worker), and every
  rank yields exactly ``batches_per_epoch`` batches, so DDP ranks never wait on one another at the end of an uneven
  epoch. The stream is a pure function of (seed, epoch), which is what makes an exact mid-epoch resume possible
  (``skip_batches``).
* **one pass** (`OnePassStream`): shards are assigned statically, ``shards[rank::world]`` then split across loader
  workers, and every sample of every shard comes out exactly once; used by protect, feature extraction and evaluation.

Bad samples (undecodable, unknown label) never stop either stream: they are skipped and counted. Training batches
carry the count of samples skipped while making them; one-pass records carry the reason.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from segue_dist.data.assign import assign_shards
from segue_dist.data.images import BadImage, decode_image, pil_to_uint8, resize_center_crop
from segue_dist.utils.io import read_json
from segue_dist.utils.seed import derive_seed

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


# ------------------------------------------------------------------------------------------------------ shard sets


@dataclass(frozen=True)
class ShardSet:
    """A split folder: its tars, their true sample counts and the label map."""

    root: Path
    shards: tuple[str, ...]
    sizes: dict[str, int]
    labels: dict[str, int]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes.values())

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def open_shard_set(path: str | Path) -> ShardSet:
    """Read a split folder written by `segue shards build` (or protect). Missing metadata is a clear error."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder not found: {root}")
    tars = sorted(p.name for p in root.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no .tar shards in {root}")
    sizes_file = root / "sizes.json"
    if not sizes_file.is_file():
        raise FileNotFoundError(f"{sizes_file} missing: is {root} a finished shard set?")
    sizes = {k: int(v) for k, v in read_json(sizes_file).items()}
    missing = [t for t in tars if t not in sizes]
    if missing:
        raise ValueError(f"{root}: shards without a size in sizes.json: {', '.join(missing[:5])}")
    absent = sorted(set(sizes) - set(tars))
    if absent:
        # Counting samples that are not there would make every rank's batches_per_epoch wrong.
        raise FileNotFoundError(f"{root}: sizes.json lists shards that are missing: {', '.join(absent[:5])}")
    labels_file = root / "labels.json"
    labels = read_json(labels_file)["labels"] if labels_file.is_file() else {}
    return ShardSet(root, tuple(str(root / t) for t in tars), sizes, labels)


# ---------------------------------------------------------------------------------------------------- sample reading


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """A shard's samples via WebDataset's tar reader (local paths, `pipe:` and remote URLs alike).

    A truncated or unreadable shard does not stop the job: the samples read before the fault come out, then one
    record carrying ``__error__`` so the fault is counted and reported like any other bad sample.
    """
    errors: list[Exception] = []

    def keep_going(exc: Exception) -> bool:
        errors.append(exc)
        return False  # stop this shard: after a tar fault nothing further in it can be trusted

    yield from tarfile_samples([{"url": url}], handler=keep_going)
    if errors:
        yield {
            "__key__": f"{Path(url).stem}:__shard_error__",
            "__error__": f"unreadable shard {Path(url).name}: {errors[0]}",
        }


def decode_sample(
    raw: dict[str, Any],
    size: tuple[int, int] | None,
    label_map: dict[str, int] | None,
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Raw WebDataset sample -> (uint8 CHW image, label, metadata); raises BadImage with the reason."""
    if "__error__" in raw:
        raise BadImage(raw["__error__"])
    ext = next((e for e in IMAGE_KEYS if e in raw), None)
    if ext is None:
        raise BadImage(f"no image in sample (fields: {', '.join(sorted(k for k in raw if not k.startswith('__')))})")
    img = decode_image(raw[ext])
    if size is not None and (img.height, img.width) != size:
        img = resize_center_crop(img, size)
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    key = raw["__key__"]
    if label_map is not None:
        if key not in label_map:
            raise BadImage(f"key {key} has no pseudo-label in the sidecar")
        label = int(label_map[key])
    else:
        try:
            label = int(raw["cls"])
        except (KeyError, ValueError):
            raise BadImage("missing or non-integer .cls label") from None
    return pil_to_uint8(img), label, meta


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _as_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---------------------------------------------------------------------------------------------------------- training


class TrainStream(IterableDataset):
    """Resampled, shuffled, fixed-length stream of (image uint8, label, skipped) for one rank.

    Each loader worker makes ``batches_per_epoch / num_workers`` whole batches (the first workers take one more
    when it does not divide), so the per-rank batch count is exact whatever the workers do.
    """

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        batch_size: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        image_size: int | tuple[int, int] | None = None,
        label_map: dict[str, int] | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.shard_set = shard_set
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.size = _as_size(image_size)
        self.label_map = label_map
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's stream; ``skip_batches`` fast-forwards past batches a resumed run already did."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def _role(self, worker: int, num_workers: int) -> int:
        """Which of the uninterrupted epoch's worker streams this loader worker replays.

        Batch i of an epoch comes from worker stream ``i % num_workers``. A DataLoader always starts its round-robin
        at worker 0, so after skipping ``n`` batches worker 0 must replay stream ``n % num_workers`` (whose next
        batch is n), worker 1 stream ``(n + 1) % num_workers`` and so on; then the resumed loader yields batches
        n, n+1, ... in order, each identical to the uninterrupted run's.
        """
        return (worker + self.skip_batches) % num_workers

    def _my_batches(self, role: int, num_workers: int) -> list[int]:
        # Global batch indices of one worker stream, round-robin so a DataLoader yields them in order 0, 1, 2, ...
        return list(range(role, self.batches_per_epoch, num_workers))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker()
        role = self._role(worker, num_workers)
        mine = self._my_batches(role, num_workers)
        if not any(b >= self.skip_batches for b in mine):
            return
        rng = random.Random(derive_seed(self.seed, "train", self.epoch, self.rank, role))
        stream = self._samples(rng)
        for batch_index in mine:
            images, labels, skipped = [], [], 0
            while len(images) < self.batch_size:
                image, label, bad = next(stream)
                skipped += bad
                if images and image.shape != images[0].shape:
                    raise ValueError(
                        f"images of different sizes in {self.shard_set.root} ({tuple(images[0].shape)} and "
                        f"{tuple(image.shape)}); pass image_size to TrainStream"
                    )
                images.append(image)
                labels.append(label)
            if batch_index < self.skip_batches:
                continue
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(skipped)

    def _samples(self, rng: random.Random) -> Iterator[tuple[torch.Tensor, int, int]]:
        """Endless shuffled samples; a shard set with no decodable sample at all is an error, not a hang.

        Shards are drawn uniformly with replacement (each draw yields all of a shard, so every sample has the same
        chance 1/num_shards per draw whatever its shard's size); shards recorded as empty are never drawn. The
        shuffle buffer holds at most the whole set: a buffer larger than the set would only fill up with repeats
        before the first sample came out.
        """
        shards = [s for s in self.shard_set.shards if self.shard_set.sizes.get(Path(s).name, 1) > 0]
        if not shards:
            raise RuntimeError(f"all shards in {self.shard_set.root} are empty")
        capacity = max(1, min(self.shuffle_buffer, self.shard_set.num_samples))
        buffer: list[tuple[torch.Tensor, int]] = []
        skipped, good_seen, raw_seen, empty_passes = 0, 0, 0, 0
        read_in_full: set[str] = set()
        while True:
            shard = rng.choice(shards)
            raw_in_shard = 0
            for raw in iter_tar_samples(shard):
                raw_seen += 1
                raw_in_shard += 1
                try:
                    image, label, _ = decode_sample(raw, self.size, self.label_map)
                except BadImage:
                    skipped += 1
                    if good_seen == 0 and raw_seen > 10_000:
                        raise RuntimeError(
                            f"no decodable sample in the first 10,000 of {self.shard_set.root}"
                        ) from None
                    continue
                good_seen += 1
                if len(buffer) < capacity:
                    buffer.append((image, label))
                    continue
                slot = rng.randrange(capacity)
                out, buffer[slot] = buffer[slot], (image, label)
                yield out[0], out[1], skipped
                skipped = 0
            empty_passes = 0 if raw_in_shard else empty_passes + 1
            if empty_passes > 100:
                raise RuntimeError(f"shards in {self.shard_set.root} hold no samples (100 reads in a row were empty)")
            if good_seen == 0:
                read_in_full.add(shard)
                if len(read_in_full) == len(shards):
                    raise RuntimeError(f"no decodable sample in any shard of {self.shard_set.root}")


def batches_per_epoch_for(num_samples: int, world_size: int, batch_size: int, samples_per_epoch: int = 0) -> int:
    """One epoch = every sample seen about once across ranks (or ``samples_per_epoch`` if given)."""
    total = samples_per_epoch or num_samples
    return max(1, total // (world_size * batch_size))


def train_loader(stream: TrainStream, num_workers: int = 2, pin_memory: bool | None = None) -> DataLoader:
    """DataLoader over a TrainStream; batching happens in the stream, so batch_size is None here."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    workers = min(num_workers, stream.batches_per_epoch)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


# ---------------------------------------------------------------------------------------------------------- one pass


@dataclass
class Record:
    """One sample of a one-pass stream; ``image`` is None and ``error`` set for a bad sample."""

    key: str
    shard: str
    image: torch.Tensor | None
    label: int
    meta: dict[str, Any]
    error: str | None = None
    raw: dict[str, Any] | None = None


@dataclass
class ShardEnd:
    """Marks that every sample of ``shard`` has been yielded (``count`` records, bad ones included)."""

    shard: str
    count: int


class OnePassStream(IterableDataset):
    """Every sample of this rank's shards exactly once, then a ShardEnd per shard."""

    def __init__(
        self,
        shards: list[str],
        *,
        image_size: int | tuple[int, int] | None = None,
        label_map: dict[str, int] | None = None,
        keep_raw: bool = False,
        decode: bool = True,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.size = _as_size(image_size)
        self.label_map = label_map
        self.keep_raw = keep_raw
        self.decode = decode

    def __iter__(self) -> Iterator[Record | ShardEnd]:
        worker, num_workers = _worker()
        for shard in self.shards[worker::num_workers]:
            count = 0
            for raw in iter_tar_samples(shard):
                count += 1
                yield self._record(shard, raw)
            yield ShardEnd(shard, count)

    def _record(self, shard: str, raw: dict[str, Any]) -> Record:
        key = raw.get("__key__", "")
        kept = raw if self.keep_raw else None
        if not self.decode:
            return Record(key, shard, None, -1, {}, raw.get("__error__"), kept)
        try:
            image, label, meta = decode_sample(raw, self.size, self.label_map)
        except BadImage as exc:
            meta = _safe_meta(raw)
            return Record(key, shard, None, -1, meta, str(exc), kept)
        return Record(key, shard, image, label, meta, None, kept)


def _safe_meta(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(raw.get("json", b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return {}


def _no_collate(item: Any) -> Any:
    # A module-level function, not a lambda: loader workers started with spawn/forkserver must pickle it.
    return item


def one_pass_loader(stream: OnePassStream, num_workers: int = 2) -> DataLoader:
    """Records one by one (no collation: images may differ in size, and bad records have none).

    Never more workers than shards: a worker without a shard would only cost a process.
    """
    workers = max(0, min(num_workers, len(stream.shards)))
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        collate_fn=_no_collate,
        prefetch_factor=64 if workers > 0 else None,
    )


def iter_batches(
    records: Iterator[Record | ShardEnd], batch_size: int
) -> Iterator[tuple[list[Record], list[Record], list[ShardEnd]]]:
    """Group a one-pass stream into (good records, bad records, finished shards) chunks of <= batch_size images.

    Good records of one batch share their image size (a size change flushes the batch), so they stack.
    """
    good: list[Record] = []
    bad: list[Record] = []
    ends: list[ShardEnd] = []
    for item in records:
        if isinstance(item, ShardEnd):
            ends.append(item)
            yield good, bad, ends
            good, bad, ends = [], [], []
            continue
        if item.image is None:
            bad.append(item)
            continue
        if good and good[0].image is not None and good[0].image.shape != item.image.shape:
            yield good, bad, ends
            good, bad, ends = [], [], []
        good.append(item)
        if len(good) >= batch_size:
            yield good, bad, ends
            good, bad, ends = [], [], []
    if good or bad or ends:
        yield good, bad, ends


def read_sample_bytes(raw: dict[str, Any]) -> bytes | None:
    ext = next((e for e in IMAGE_KEYS if e in raw), None)
    return raw[ext] if ext else None


def image_from_bytes(data: bytes) -> torch.Tensor:
    return pil_to_uint8(decode_image(data))


__all__ = [
    "ShardSet",
    "open_shard_set",
    "TrainStream",
    "train_loader",
    "batches_per_epoch_for",
    "OnePassStream",
    "one_pass_loader",
    "Record",
    "ShardEnd",
    "assign_shards",
    "iter_batches",
    "iter_tar_samples",
    "decode_sample",
]
