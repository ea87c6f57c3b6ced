"""The attacker's data: a split in memory (:class:`ImageSet`), partial protection, and the training and test feeds
(in memory, or streamed with the WebDataset ``TrainStream`` above ``train.memory_limit_gb``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from segue_dist.attacks import AttackerConfig, select_protected
from segue_dist.attacks import transform_images as attacker_transform
from segue_dist.data.loader import (
    OnePassStream,
    Record,
    ShardSet,
    TrainStream,
    batches_per_epoch_for,
    iter_batches,
    one_pass_loader,
    open_shard_set,
    train_loader,
)
from segue_dist.evaluate.config import VictimConfig
from segue_dist.utils.seed import derive_seed


@dataclass
class ImageSet:
    """A split in memory: uint8 images sorted by key, with what is needed to write it back out."""

    root: str
    keys: list[str]
    images: Tensor  # (N, 3, H, W) uint8
    labels: Tensor  # (N,) int64
    label_map: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)  # shard file name per sample (keep_meta)
    positions: list[int] = field(default_factory=list)  # index inside its shard (keep_meta)
    extras: list[dict[str, bytes]] = field(default_factory=list)  # raw .cls / .json bytes (keep_meta)

    @property
    def num_classes(self) -> int:
        top = int(self.labels.max()) + 1 if len(self.labels) else 0
        return max(len(self.label_map), top)


def _size_pair(size: int) -> tuple[int, int] | None:
    return (size, size) if size else None


def load_image_set(path: str | Path, size: int = 0, workers: int = 2, keep_meta: bool = False) -> ImageSet:
    """Read every sample of a split once (one-pass loader) into a uint8 tensor; bad samples are skipped and listed."""
    shard_set = open_shard_set(path)
    stream = OnePassStream(list(shard_set.shards), image_size=_size_pair(size), keep_raw=keep_meta)
    good: list[Record] = []
    skipped: list[dict[str, str]] = []
    positions: dict[str, int] = {}
    for record in one_pass_loader(stream, num_workers=workers):
        if not isinstance(record, Record):
            continue
        position = positions.get(record.shard, 0)
        positions[record.shard] = position + 1
        if record.image is None:
            skipped.append({"key": record.key, "reason": record.error or "unknown"})
            continue
        record.meta = {"position": position}
        good.append(record)
    if not good:
        raise ValueError(f"{path}: no decodable sample ({len(skipped)} skipped)")
    good.sort(key=lambda r: r.key)
    shapes = {tuple(r.image.shape) for r in good if r.image is not None}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images differ in size ({', '.join(map(str, sorted(shapes)[:3]))}); pass a size")
    return ImageSet(
        root=str(path),
        keys=[r.key for r in good],
        images=torch.stack([r.image for r in good if r.image is not None]),
        labels=torch.tensor([r.label for r in good], dtype=torch.long),
        label_map=dict(shard_set.labels),
        skipped=skipped,
        shards=[Path(r.shard).name for r in good] if keep_meta else [],
        positions=[int(r.meta["position"]) for r in good] if keep_meta else [],
        extras=[_extras(r.raw) for r in good] if keep_meta else [],
    )


def _extras(raw: dict[str, Any] | None) -> dict[str, bytes]:
    # Everything but the image: .cls and .json travel to the protected copy byte for byte.
    return {k: v for k, v in (raw or {}).items() if k in ("cls", "json") and isinstance(v, bytes)}


def mix_partial(protected: ImageSet, clean: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, int]:
    """Partial protection: a seeded ``fraction`` of the keys from the protected set, the rest from the clean one."""
    clean_index = {k: i for i, k in enumerate(clean.keys)}
    missing = [k for k in protected.keys if k not in clean_index]
    if missing:
        raise ValueError(
            f"partial protection: {len(missing)} protected keys are not in the clean set (e.g. {missing[0]})"
        )
    if protected.images.shape[1:] != clean.images.shape[1:]:
        raise ValueError(
            f"partial protection: image sizes differ ({tuple(protected.images.shape[1:])} vs {tuple(clean.images.shape[1:])})"
        )
    chosen = select_protected(protected.keys, fraction, seed)
    images = protected.images.clone()
    for i, (key, take_protected) in enumerate(zip(protected.keys, chosen, strict=True)):
        if not take_protected:
            images[i] = clean.images[clean_index[key]]
    mixed = ImageSet(protected.root, protected.keys, images, protected.labels, protected.label_map, protected.skipped)
    return mixed, sum(chosen)


def check_label_maps(train: dict[str, int], test: dict[str, int], where: str) -> None:
    if train and test and train != test:
        only = sorted(set(train.items()) ^ set(test.items()))[:2]
        raise ValueError(f"{where}: train and test label maps differ (e.g. {only}); build both splits together")


def _peek_size(shard_set: ShardSet, size: int) -> tuple[int, int]:
    if size:
        return (size, size)
    for record in OnePassStream([shard_set.shards[0]]):
        if isinstance(record, Record) and record.image is not None:
            return (int(record.image.shape[-2]), int(record.image.shape[-1]))
    raise ValueError(f"{shard_set.root}: no decodable sample in {Path(shard_set.shards[0]).name}")


# ------------------------------------------------------------------------------------------- data (train and test feeds)


class TrainFeed:
    """Batches of (uint8 images, labels) for one epoch, already through the attacker's data transforms."""

    num_samples: int
    num_batches: int
    image_size: tuple[int, int]
    skipped: int = 0

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError


class MemoryFeed(TrainFeed):
    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int, device: torch.device) -> None:
        # On CUDA the whole uint8 set moves to the device once: small evaluation sets fit easily.
        self.images = images.to(device) if device.type == "cuda" else images
        self.labels = labels
        self.batch_size, self.seed = batch_size, seed
        self.num_samples = len(labels)
        self.image_size = (int(images.shape[-2]), int(images.shape[-1]))
        # Drop the last partial batch (BatchNorm cannot train on a batch of one), unless it is the only one.
        self.num_batches = max(1, self.num_samples // batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(
            self.num_samples, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        )
        for b in range(self.num_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx.to(self.images.device)], self.labels[idx]


class StreamFeed(TrainFeed):
    """Large training sets: the resampled WebDataset stream, data transforms applied per batch on the fly."""

    def __init__(self, shard_set: ShardSet, cfg: VictimConfig, attack: AttackerConfig) -> None:
        self.cfg, self.attack = cfg, attack
        self.num_samples = shard_set.num_samples
        self.num_batches = batches_per_epoch_for(self.num_samples, 1, cfg.batch_size)
        h, w = _peek_size(shard_set, cfg.size)
        self.image_size = attack.train_size(h, w)
        self.stream = TrainStream(
            shard_set,
            batch_size=cfg.batch_size,
            batches_per_epoch=self.num_batches,
            seed=derive_seed(cfg.seed, "victim-stream"),
            image_size=_size_pair(cfg.size),
        )

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.stream.set_epoch(epoch)
        for images, labels, skipped in train_loader(self.stream, num_workers=self.cfg.workers):
            self.skipped += int(skipped)
            yield attacker_transform(images, self.attack, train=True), labels


class TestFeed:
    """Clean test images (through the attacker's test-time transforms): in memory, or streamed for big sets."""

    def __init__(self, path: str, cfg: VictimConfig, attack: AttackerConfig, in_memory: bool) -> None:
        self.cfg, self.attack = cfg, attack
        self.shard_set = open_shard_set(path)
        self.num_samples = self.shard_set.num_samples
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        if in_memory:
            data = load_image_set(path, cfg.size, cfg.workers)
            self.images, self.labels = attacker_transform(data.images, attack, train=False), data.labels
            self.num_samples = len(data.labels)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        bs = self.cfg.eval_batch_size
        if self.images is not None and self.labels is not None:
            for start in range(0, self.num_samples, bs):
                yield self.images[start : start + bs], self.labels[start : start + bs]
            return
        stream = OnePassStream(list(self.shard_set.shards), image_size=_size_pair(self.cfg.size))
        for good, _, _ in iter_batches(iter(one_pass_loader(stream, self.cfg.workers)), bs):
            if good:
                images = torch.stack([r.image for r in good if r.image is not None])
                yield attacker_transform(images, self.attack, train=False), torch.tensor([r.label for r in good])


def _use_memory(shard_set: ShardSet, cfg: VictimConfig) -> bool:
    if cfg.mode != "auto":
        return cfg.mode == "memory"
    h, w = _peek_size(shard_set, cfg.size)
    return shard_set.num_samples * 3 * h * w <= cfg.memory_limit_gb * 2**30


@dataclass
class PreparedData:
    feed: TrainFeed
    test: TestFeed
    num_classes: int
    info: dict[str, Any]


def prepare_data(
    train_dir: str,
    test_dir: str,
    cfg: VictimConfig,
    attack: AttackerConfig,
    device: torch.device,
    clean_train: str = "",
) -> PreparedData:
    """Training feed (protected, partially protected or clean) and clean test feed, with the attacker's transforms."""
    shard_set = open_shard_set(train_dir)
    test_set = open_shard_set(test_dir)
    in_memory = _use_memory(shard_set, cfg)
    info: dict[str, Any] = {"train_dir": train_dir, "test_dir": test_dir, "mode": "memory" if in_memory else "stream"}
    if in_memory:
        data = load_image_set(train_dir, cfg.size, cfg.workers)
        if attack.protected_fraction < 1.0:
            if not clean_train:
                raise ValueError("attack.protected_fraction < 1 needs the clean training split (clean_train)")
            data, n_protected = mix_partial(
                data, load_image_set(clean_train, cfg.size, cfg.workers), attack.protected_fraction, cfg.seed
            )
            info.update(clean_train=clean_train, protected_samples=n_protected)
        images = attacker_transform(data.images, attack, train=True, labels=data.labels)
        feed: TrainFeed = MemoryFeed(images, data.labels, cfg.batch_size, cfg.seed, device)
        feed.skipped = len(data.skipped)
        label_map, num_classes = data.label_map, data.num_classes
    else:
        if attack.protected_fraction < 1.0:
            raise ValueError("partial protection pairs samples by key and needs memory mode (train.mode=memory)")
        if attack.orthogonal_projection:
            raise ValueError("orthogonal_projection fits a model to the whole training set: use train.mode=memory")
        feed = StreamFeed(shard_set, cfg, attack)
        label_map, num_classes = shard_set.labels, shard_set.num_classes
    check_label_maps(label_map, test_set.labels, train_dir)
    test = TestFeed(test_dir, cfg, attack, in_memory=in_memory)
    if test.labels is not None and len(test.labels):
        num_classes = max(num_classes, int(test.labels.max()) + 1)
    info.update(train_samples=feed.num_samples, train_skipped=feed.skipped, test_samples=test.num_samples)
    return PreparedData(feed, test, num_classes, info)
