"""`segue evaluate`: the attacker's side. Train victims on protected data and test them on clean data.

The paper's metric (Section IV-A) is the **clean-test accuracy** of a victim trained from scratch on the protected
training set: the lower, the better the protection, with 100/K (chance) the floor. Every result here carries chance and
the ratio to chance beside the accuracy, and the same victim trained on the clean set is the control.

Actions::

    segue evaluate victim   --train P --test T [--clean-train C --control] [--arch resnet18] [train.epochs=8 ...]
    segue evaluate baseline --method ue|ue-classwise|lsp|lsp-classwise|random|random-classwise --in C --out P
    segue evaluate quality  --clean C --protected P [--lpips-weights alexnet.pth [--lpips-lin alex.pth]]
    segue evaluate sweep    --config configs/experiments/x.yaml [key=value ...]

Victims load the training set into memory as uint8 (small evaluation sets: LFW-62 at 64 px is ~35 MB) or, above
``train.memory_limit_gb``, stream it with the WebDataset ``TrainStream``. The attacker's transforms live in
``segue_dist.attacks``; a sweep runs every (method x victim x attack) row, writes one JSON per row, and resumes by
skipping rows whose JSON exists with the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor, nn

from segue_dist.attacks import AttackerConfig, pgd_linf, select_protected, train_batch_transform
from segue_dist.attacks import transform_images as attacker_transform
from segue_dist.config import ConfigError, config_hash, load_config, save_resolved, to_dict
from segue_dist.data.images import encode_png
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
from segue_dist.utils.dist import best_device
from segue_dist.utils.io import atomic_open, atomic_write_json, read_json, remove_stale_temps
from segue_dist.utils.progress import console, make_progress, print_table
from segue_dist.utils.seed import derive_seed, seed_everything

# Fixed tar member mtime, as in shards.py: the same inputs give byte-identical shards.
TAR_MTIME = 0.0
BASELINE_STATS = "baseline.json"
# method name -> (library baseline, its keyword options)
BASELINE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ue": ("ue", {"mode": "samplewise"}),
    "ue-classwise": ("ue", {"mode": "classwise"}),
    "lsp": ("lsp", {}),
    "lsp-classwise": ("lsp", {"samplewise": False}),
    "random": ("random", {}),
    "random-classwise": ("random", {"classwise": True}),
}


# ------------------------------------------------------------------------------------------------------------ configs


@dataclass
class VictimConfig:
    """How a victim is trained.

    Adam (1e-3) is the default because the short CPU runs need it: ResNet-18 on glint24 at 32 px reaches 54% clean-test
    accuracy after 8 epochs with Adam and 24% with SGD (0.1, momentum 0.9), chance being 4.2%. For long GPU runs the
    paper-style recipe is ``optimizer=sgd lr=0.1`` (cosine, weight decay 5e-4).
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 0.0  # 0 = the optimizer's default: SGD 0.1, Adam 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 0 (per step)
    size: int = 0  # load images at size x size (short side resized, centre-cropped, as shards build); 0 = as stored
    small_stem: bool | None = None  # None = the classifier factory's choice (small-image stem at <= 112 px)
    seed: int = 0
    mode: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = 4.0  # auto mode streams training sets larger than this as uint8
    workers: int = 2
    eval_every: int = 1  # clean-test accuracy every n epochs (and always after the last)
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1 (got {self.lr}, {self.weight_decay}, {self.momentum})"
            )
        if self.warmup_epochs < 0 or self.workers < 0:
            raise ValueError("warmup_epochs and workers must be >= 0")
        if self.size and self.size < 8:
            raise ValueError(f"size must be 0 (as stored) or >= 8, got {self.size}")
        if self.memory_limit_gb <= 0:
            raise ValueError(f"memory_limit_gb must be > 0, got {self.memory_limit_gb}")

    @property
    def learning_rate(self) -> float:
        return self.lr or (0.1 if self.optimizer == "sgd" else 1e-3)


@dataclass
class VictimRunConfig:
    """`segue evaluate victim`: one victim on one training set (plus, optionally, the clean control)."""

    train_dir: str = ""  # the (protected) training split
    test_dir: str = ""  # clean test split
    clean_train: str = ""  # clean training split: partial protection, and the control with control=true
    control: bool = False  # also train the same victim on clean_train
    arch: str = "resnet18"
    dataset: str = ""  # names in the result (report tables)
    method: str = "protected"
    out: str = "runs/eval/victim"
    device: str = ""  # "" = CUDA when present, else CPU
    train: VictimConfig = field(default_factory=VictimConfig)
    attack: AttackerConfig = field(default_factory=AttackerConfig)


@dataclass
class BaselineConfig:
    """`segue evaluate baseline`: write a baseline-protected copy of a training split."""

    method: str = "lsp"
    in_dir: str = ""
    out_dir: str = ""
    eps: float = 8 / 255
    seed: int = 0
    size: int = 0  # 0 = as stored; the protected set is written at this size
    surrogate: str = "resnet18"  # UE's surrogate model
    surrogate_small_stem: bool | None = None
    device: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword options of the library baseline

    def __post_init__(self) -> None:
        if self.method not in BASELINE_METHODS:
            raise ValueError(f"method must be one of {', '.join(BASELINE_METHODS)}, got {self.method!r}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (e.g. 8/255), got {self.eps}")


@dataclass
class MethodSpec:
    """One training set of a sweep: the clean control, a protect output, or a baseline generated on demand."""

    name: str = ""
    train: str = ""  # protected training split; "" = data.clean_train (name "clean") or <out>/baselines/<name>/train
    baseline: str = ""  # one of BASELINE_METHODS: generate `train` with it when missing
    eps: float = 8 / 255
    options: dict[str, Any] = field(default_factory=dict)  # baseline keyword options (e.g. ue max_rounds)
    source: str = ""  # free text for the report, e.g. "generator trained on lfw62"
    time_s: float = 0.0  # generation wall time when measured elsewhere (Table VII); baselines record their own

    def __post_init__(self) -> None:
        if not self.name or "__" in self.name or "/" in self.name:
            raise ValueError(f"method name must be non-empty without '__' or '/', got {self.name!r}")
        if self.baseline and self.baseline not in BASELINE_METHODS:
            raise ValueError(f"methods.{self.name}.baseline must be one of {', '.join(BASELINE_METHODS)}")
        if self.name != "clean" and not self.train and not self.baseline:
            raise ValueError(f"method {self.name!r} needs `train` (a protected split) or `baseline`")


@dataclass
class DataSpec:
    dataset: str = ""  # the name used in report tables (lfw62, glint24, ...)
    clean_train: str = ""
    test: str = ""

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("data.dataset (a name for the report) is required")


@dataclass
class SweepConfig:
    """A table's worth of victims: every method x victim x attack row."""

    name: str = ""
    out: str = ""  # default runs/eval/<name>
    seed: int = 0
    device: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    methods: list[MethodSpec] = field(default_factory=list)
    victims: list[str] = field(default_factory=lambda: ["resnet18"])
    attacks: list[AttackerConfig] = field(default_factory=lambda: [AttackerConfig()])
    train: VictimConfig = field(default_factory=VictimConfig)
    quality: bool = True  # image quality of every protected set against the clean training set
    lpips_weights: str = ""  # local AlexNet ImageNet weights; empty = LPIPS skipped
    lpips_lin: str = ""  # local LPIPS v0.1 lin weights (alex.pth); empty = uncalibrated LPIPS
    surrogate: str = "resnet18"  # UE baselines' surrogate

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name is required")
        if not self.methods:
            raise ValueError("methods must list at least one training set (e.g. - name: clean)")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        attacks = [a.name for a in self.attacks]
        if not attacks or len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks need unique names, got {attacks}")
        if not self.victims or len(set(self.victims)) != len(self.victims):
            raise ValueError(f"victims must be a non-empty list without repeats, got {self.victims}")
        from segue_dist.models.classifiers import ARCHITECTURES

        unknown = [v for v in self.victims if v not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown victim {unknown[0]!r}; allowed: {', '.join(ARCHITECTURES)}")
        if not self.out:
            self.out = f"runs/eval/{self.name}"


# ------------------------------------------------------------------------------------------------------ data (memory)


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


def _check_label_maps(train: dict[str, int], test: dict[str, int], where: str) -> None:
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
        images = attacker_transform(data.images, attack, train=True)
        feed: TrainFeed = MemoryFeed(images, data.labels, cfg.batch_size, cfg.seed, device)
        feed.skipped = len(data.skipped)
        label_map, num_classes = data.label_map, data.num_classes
    else:
        if attack.protected_fraction < 1.0:
            raise ValueError("partial protection pairs samples by key and needs memory mode (train.mode=memory)")
        feed = StreamFeed(shard_set, cfg, attack)
        label_map, num_classes = shard_set.labels, shard_set.num_classes
    _check_label_maps(label_map, test_set.labels, train_dir)
    test = TestFeed(test_dir, cfg, attack, in_memory=in_memory)
    if test.labels is not None and len(test.labels):
        num_classes = max(num_classes, int(test.labels.max()) + 1)
    info.update(train_samples=feed.num_samples, train_skipped=feed.skipped, test_samples=test.num_samples)
    return PreparedData(feed, test, num_classes, info)


# ---------------------------------------------------------------------------------------------------------- training


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast on CUDA only: CPU autocast is slower than fp32 for these small convnets.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_input(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device, non_blocking=True).float().div_(255.0)


def _channels_last(x: Tensor) -> Tensor:
    # After the batch transforms (which build fresh NCHW tensors): the layout cuDNN's fast convolutions want.
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def build_optimizer(
    model: nn.Module, cfg: VictimConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum, weight decay) or Adam, with linear warm-up then cosine decay to 0, stepped per batch."""
    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    per_epoch = max(1, steps // cfg.epochs)
    warmup = min(cfg.warmup_epochs * per_epoch, steps - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, progress))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def test_accuracy(model: nn.Module, test: TestFeed, device: torch.device) -> float:
    """Clean-test accuracy in percent."""
    model.eval()
    correct = total = 0
    for images, labels in test.batches():
        with _autocast(device):
            logits = model(_channels_last(_to_input(images, device)))
        correct += int((logits.argmax(1).cpu() == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(1, total)


def train_victim(
    arch: str,
    data: PreparedData,
    cfg: VictimConfig,
    attack: AttackerConfig,
    device: torch.device,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``arch`` from scratch on the feed; returns per-epoch history and the final clean-test accuracy."""
    from segue_dist.models.classifiers import build_classifier

    seed_everything(cfg.seed)
    k = data.num_classes
    model = build_classifier(arch, k, image_size=data.feed.image_size, small_stem=cfg.small_stem).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = cfg.epochs * data.feed.num_batches
    opt, sched = build_optimizer(model, cfg, steps)
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        row = _train_epoch(model, data, cfg, attack, device, opt, sched, epoch)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row["test_acc"] = test_accuracy(model, data.test, device)
        row["elapsed_s"] = round(time.perf_counter() - start, 2)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    final = history[-1]["test_acc"]
    chance = 100.0 / k
    return {
        "num_classes": k,
        "chance": chance,
        "final_acc": final,
        "x_chance": final / chance,
        "epochs": history,
        "train_seconds": round(time.perf_counter() - start, 2),
        "image_size": list(data.feed.image_size),
    }


def _train_epoch(
    model: nn.Module,
    data: PreparedData,
    cfg: VictimConfig,
    attack: AttackerConfig,
    device: torch.device,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
) -> dict[str, Any]:
    model.train()
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", epoch))
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in data.feed.batches(epoch):
        x, targets = train_batch_transform(_to_input(images, device), labels.to(device), data.num_classes, attack, gen)
        x = _channels_last(x)
        if attack.adv_rho > 0:
            with _autocast(device):
                x = pgd_linf(
                    model,
                    x,
                    targets,
                    rho=attack.adv_rho,
                    steps=attack.adv_steps,
                    step_size=attack.step_size,
                    generator=gen,
                )
        with _autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == targets.argmax(1)).sum())
        seen += len(labels)
    if not np.isfinite(loss_sum):
        raise RuntimeError(f"victim training diverged at epoch {epoch + 1} (loss is not finite); lower train.lr")
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(1, seen),
        "train_acc": 100.0 * correct / max(1, seen),
        "lr": sched.get_last_lr()[0],
    }


def _device(name: str) -> torch.device:
    return torch.device(name) if name else best_device()


def run_victim(
    *,
    arch: str,
    train_dir: str,
    test_dir: str,
    cfg: VictimConfig,
    attack: AttackerConfig,
    tags: dict[str, Any],
    device: torch.device,
    clean_train: str = "",
    show_progress: bool = True,
) -> dict[str, Any]:
    """One complete victim run as a result record (the JSON written per row)."""
    start = time.perf_counter()
    data = prepare_data(train_dir, test_dir, cfg, attack, device, clean_train)
    label = f"{tags.get('method', '?')} / {arch} / {attack.name}"
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task(label, total=cfg.epochs)

        def on_epoch(row: dict[str, Any]) -> None:
            acc = f" test {row['test_acc']:.1f}%" if "test_acc" in row else ""
            progress.update(task, advance=1, info=f"loss {row['train_loss']:.3f} train {row['train_acc']:.1f}%{acc}")

        result = train_victim(arch, data, cfg, attack, device, on_epoch)
    return {
        "kind": "victim",
        "name": row_name(tags.get("method", "protected"), arch, attack.name),
        "tags": {**tags, "victim": arch, "attack": attack.name, "group": attack.group, "attack_config": asdict(attack)},
        "data": data.info,
        "config": {"train": asdict(cfg), "attack": asdict(attack)},
        **result,
        "wall_s": round(time.perf_counter() - start, 2),
        "device": str(device),
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()},
    }


def row_name(method: str, victim: str, attack: str) -> str:
    return f"{method}__{victim}__{attack}"


# ------------------------------------------------------------------------------------------------------ image quality


def _index_keys(shard_set: ShardSet, workers: int) -> dict[str, str]:
    """key -> shard path, from a pass that reads but does not decode."""
    index: dict[str, str] = {}
    for record in one_pass_loader(OnePassStream(list(shard_set.shards), decode=False), workers):
        if isinstance(record, Record) and record.error is None:
            index[record.key] = record.shard
    return index


def _decode_shard(shard: str, wanted: set[str] | None = None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for record in OnePassStream([shard]):
        if isinstance(record, Record) and record.image is not None and (wanted is None or record.key in wanted):
            out[record.key] = record.image
    return out


def iter_pairs(
    clean_dir: str, protected_dir: str, workers: int = 2
) -> Iterator[tuple[str, Tensor, Tensor] | tuple[str, None, None]]:
    """(key, clean uint8, protected uint8) for every protected sample, paired by key; (key, None, None) if unpaired.

    Memory stays at about two shards: protected shards are read one at a time and only the clean shards holding
    their keys are decoded (a protect output keeps the shard layout, so that is usually the same-named one).
    """
    clean_index = _index_keys(open_shard_set(clean_dir), workers)
    for shard in open_shard_set(protected_dir).shards:
        protected = _decode_shard(shard)
        by_clean_shard: dict[str, set[str]] = {}
        for key in protected:
            if key in clean_index:
                by_clean_shard.setdefault(clean_index[key], set()).add(key)
        clean: dict[str, Tensor] = {}
        for clean_shard, keys in sorted(by_clean_shard.items()):
            clean.update(_decode_shard(clean_shard, keys))
        for key in sorted(protected):
            if key in clean:
                yield key, clean[key], protected[key]
            else:
                yield key, None, None


def image_quality_between(
    clean_dir: str,
    protected_dir: str,
    *,
    lpips_model: nn.Module | None = None,
    batch_size: int = 64,
    device: torch.device | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Table III metrics over every key pair: means of PSNR (capped), SSIM, MS-SSIM (>= 161 px), LPIPS, MAE, RMSE;
    L∞ as max and mean (in [0, 1] units and in 8-bit steps)."""
    from segue_dist.metrics.image_quality import MS_SSIM_MIN_SIDE, PSNR_CAP_DB, image_quality_per_image

    device = device or torch.device("cpu")
    sums: dict[str, list[float]] = {}
    pending: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}
    counts = {"pairs": 0, "unpaired": 0, "size_mismatch": 0}
    small = 0
    lpips_skipped = [0]

    def flush(shape: tuple[int, ...]) -> None:
        pairs = pending.pop(shape, [])
        if not pairs:
            return
        x = torch.stack([c for c, _ in pairs]).to(device).float().div_(255)
        y = torch.stack([p for _, p in pairs]).to(device).float().div_(255)
        # LPIPS's backbone needs a minimum side (AlexNet: 32 px at least); smaller images are left out of its mean.
        fits = lpips_model is not None and min(shape[-2:]) >= getattr(lpips_model, "min_side", 0)
        lpips_skipped[0] += 0 if fits or lpips_model is None else len(pairs)
        for name, values in image_quality_per_image(x, y, lpips_model if fits else None).items():
            if name == "psnr":
                values = values.clamp(max=PSNR_CAP_DB)
            sums.setdefault(name, []).extend(values.tolist())

    for _key, clean, protected in iter_pairs(clean_dir, protected_dir, workers):
        if clean is None or protected is None:
            counts["unpaired"] += 1
            continue
        if clean.shape != protected.shape:
            counts["size_mismatch"] += 1
            continue
        counts["pairs"] += 1
        small += min(clean.shape[-2:]) < MS_SSIM_MIN_SIDE
        pending.setdefault(tuple(clean.shape), []).append((clean, protected))
        if len(pending[tuple(clean.shape)]) >= batch_size:
            flush(tuple(clean.shape))
    for shape in list(pending):
        flush(shape)
    if not counts["pairs"]:
        raise ValueError(f"no sample of {protected_dir} has a same-sized counterpart (by key) in {clean_dir}")
    metrics = {name: float(np.mean(v)) for name, v in sums.items() if name != "linf"}
    linf = np.asarray(sums["linf"])
    metrics.update(linf=float(linf.max()), linf_mean=float(linf.mean()), linf_255=round(float(linf.max()) * 255, 3))
    notes = {}
    if "ms_ssim" not in metrics:
        notes["ms_ssim"] = f"skipped: images smaller than {MS_SSIM_MIN_SIDE} px"
    elif small:
        notes["ms_ssim"] = f"over the {counts['pairs'] - small} images of at least {MS_SSIM_MIN_SIDE} px"
    if lpips_skipped[0]:
        notes["lpips"] = f"{lpips_skipped[0]} images below LPIPS's minimum side left out"
    return {"metrics": metrics, "counts": counts, "notes": notes, "ms_ssim_images": counts["pairs"] - small}


def load_lpips(weights: str, lin: str = "") -> tuple[nn.Module | None, str]:
    """LPIPS from local files only, with a note on its variant; (None, why) when no weights are given."""
    from segue_dist.metrics.image_quality import LPIPS, lpips_available

    if not weights:
        return None, "skipped: no local LPIPS weights (pass --lpips-weights PATH to an AlexNet ImageNet state dict)"
    ok, reason = lpips_available(weights, lin or None)
    if not ok:  # weights were asked for: a wrong path is an error, not a silently missing column
        raise FileNotFoundError(reason)
    return LPIPS.from_local(weights, lin or None), reason


def run_quality(
    clean_dir: str,
    protected_dir: str,
    *,
    lpips_weights: str = "",
    lpips_lin: str = "",
    device: torch.device | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    device = device or torch.device("cpu")
    model, lpips_note = load_lpips(lpips_weights, lpips_lin)
    if model is not None:
        model = model.to(device)
    result = image_quality_between(clean_dir, protected_dir, lpips_model=model, device=device, workers=workers)
    result["notes"]["lpips"] = "; ".join(n for n in (lpips_note, result["notes"].get("lpips", "")) if n)
    return {"kind": "quality", "clean": clean_dir, "protected": protected_dir, **result}


# ---------------------------------------------------------------------------------------------------------- baselines


def _write_split(out_dir: Path, data: ImageSet, protected: Tensor, stats_extra: dict[str, Any]) -> dict[str, int]:
    """Write protected images with the input's shard names, keys, order, .cls and .json (PNG: lossless)."""
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(data.shards):
        by_shard.setdefault(shard, []).append(i)
    sizes: dict[str, int] = {}
    for shard in sorted(by_shard):
        members = sorted(by_shard[shard], key=lambda i: data.positions[i])
        tar_path = out_dir / shard
        with atomic_open(tar_path, "wb") as fh:
            sink = wds.TarWriter(fh, mtime=TAR_MTIME, encoder=False)
            for i in members:
                array = protected[i].permute(1, 2, 0).numpy()
                sink.write({"__key__": data.keys[i], "png": encode_png(array), **data.extras[i]})
            sink.close()
        sizes[shard] = len(members)
        atomic_write_json(
            tar_path.with_name(shard.replace(".tar", "._stats.json")),
            {"shard": shard, "written": len(members), "skipped": 0, **stats_extra},
        )
    return sizes


def _quantise(images: Tensor, delta: Tensor) -> Tensor:
    return (images.float() / 255.0 + delta.cpu().float()).clamp(0, 1).mul(255).round().to(torch.uint8)


def verify_written(out_dir: str | Path, clean: ImageSet, eps: float, workers: int = 2) -> dict[str, float]:
    """Re-read the written shards and check |protected - clean| <= eps on the uint8 pixels, key by key."""
    limit = int(np.floor(eps * 255 + 1e-6))
    index = {k: i for i, k in enumerate(clean.keys)}
    worst, total, count = 0, 0.0, 0
    for record in one_pass_loader(OnePassStream(list(open_shard_set(out_dir).shards)), workers):
        if not isinstance(record, Record):
            continue
        if record.image is None or record.key not in index:
            raise ValueError(f"{out_dir}: written sample {record.key} is unreadable or has no clean counterpart")
        diff = (record.image.int() - clean.images[index[record.key]].int()).abs()
        worst = max(worst, int(diff.max()))
        total += float(diff.float().mean())
        count += 1
    if count != len(clean.keys):
        raise ValueError(f"{out_dir}: {count} samples written, expected {len(clean.keys)}")
    if worst > limit:
        raise ValueError(f"{out_dir}: a pixel moved by {worst}/255, above eps = {limit}/255")
    return {"linf_255": worst, "eps_255": limit, "mae_255": total / max(1, count)}


def write_baseline(cfg: BaselineConfig, show_progress: bool = True) -> dict[str, Any]:
    """Baseline-protect a training split into a shard set laid out like `segue protect` output; returns the stats."""
    from segue_dist.baselines import make_baseline_perturbations
    from segue_dist.models.classifiers import build_classifier

    start = time.perf_counter()
    device = _device(cfg.device)
    in_dir, out_dir = Path(cfg.in_dir), Path(cfg.out_dir)
    if in_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out must differ from --in ({in_dir})")
    data = load_image_set(in_dir, cfg.size, keep_meta=True)
    library_method, options = BASELINE_METHODS[cfg.method]
    options = {**options, **cfg.options}
    size = (int(data.images.shape[-2]), int(data.images.shape[-1]))
    k = data.num_classes
    if library_method == "ue":
        options.setdefault("device", device)
    factory = (
        (lambda: build_classifier(cfg.surrogate, k, size, small_stem=cfg.surrogate_small_stem))
        if library_method == "ue"
        else None
    )
    console.print(
        f"[bold]baseline {cfg.method}[/]: {len(data.keys)} images {size[0]}x{size[1]}, {k} classes, eps {cfg.eps * 255:.2f}/255"
    )
    seed_everything(cfg.seed)
    gen_start = time.perf_counter()
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task(f"generating {cfg.method}", total=None)
        if library_method == "ue":
            options.setdefault(
                "progress_callback", lambda rnd, acc: progress.update(task, info=f"round {rnd} surrogate acc {acc:.3f}")
            )
        delta = make_baseline_perturbations(
            library_method,
            data.images.float().div(255),
            data.labels,
            k,
            eps=cfg.eps,
            seed=cfg.seed,
            model_factory=factory,
            keys=data.keys,
            **options,
        )
    generation_s = time.perf_counter() - gen_start
    protected = _quantise(data.images, delta)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    shard_stats = {"method": cfg.method, "eps": cfg.eps}
    sizes = _write_split(out_dir, data, protected, shard_stats)
    atomic_write_json(out_dir / "labels.json", {"labels": data.label_map, "num_classes": len(data.label_map)})
    atomic_write_json(out_dir / "sizes.json", sizes)
    check = verify_written(out_dir, data, cfg.eps)
    stats = {
        "kind": "baseline",
        "method": cfg.method,
        "in": str(in_dir),
        "out": str(out_dir),
        "samples": len(data.keys),
        "skipped": data.skipped,
        "image_size": list(size),
        "num_classes": k,
        "generation_s": round(generation_s, 3),
        "total_s": round(time.perf_counter() - start, 3),
        "device": str(device),
        "check": check,
        "config": to_dict(cfg),
    }
    atomic_write_json(out_dir / BASELINE_STATS, stats)
    return stats


def baseline_is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / BASELINE_STATS).is_file() and (Path(out_dir) / "sizes.json").is_file()


# -------------------------------------------------------------------------------------------------------------- sweep


@dataclass
class Row:
    method: MethodSpec
    victim: str
    attack: AttackerConfig
    train_dir: str

    @property
    def name(self) -> str:
        return row_name(self.method.name, self.victim, self.attack.name)


def method_train_dir(cfg: SweepConfig, method: MethodSpec) -> str:
    """The method's training split; ``{size}`` in a path becomes the victims' image size (baselines differ by size)."""
    if method.train:
        path = method.train
    elif method.name == "clean":
        path = cfg.data.clean_train
    else:
        path = str(Path(cfg.out) / "baselines" / f"{method.name}-{{size}}" / "train")
    return path.replace("{size}", str(cfg.train.size or "native"))


def plan_rows(cfg: SweepConfig, only: str = "") -> list[Row]:
    rows = [
        Row(method, victim, attack, method_train_dir(cfg, method))
        for method in cfg.methods
        for victim in cfg.victims
        for attack in cfg.attacks
    ]
    return [r for r in rows if not only or fnmatch.fnmatch(r.name, only)]


def _row_hash(cfg: SweepConfig, row: Row) -> str:
    # What decides a row's number: a saved row with the same hash is reused on resume, any change reruns it.
    blob = {
        "data": asdict(cfg.data),
        "train_dir": row.train_dir,
        "victim": row.victim,
        "attack": asdict(row.attack),
        "train": asdict(cfg.train),
        "seed": cfg.seed,
    }
    return config_hash(blob)


def _check_inputs(cfg: SweepConfig, rows: list[Row]) -> None:
    """Fail before any training when an input that cannot be generated here is missing."""
    needed = {cfg.data.test: "data.test", cfg.data.clean_train: "data.clean_train"}
    for row in rows:
        if not row.method.baseline:
            needed.setdefault(row.train_dir, f"methods.{row.method.name}.train")
    for path, what in needed.items():
        if not path:
            raise ConfigError(f"{what} is empty")
        if not (Path(path) / "sizes.json").is_file():
            hint = (
                " (make it with `segue protect --generator G --in <clean train> --out <this>`)"
                if what.startswith("methods")
                else ""
            )
            raise FileNotFoundError(f"{what}: no finished shard set at {path}{hint}")


def ensure_baselines(cfg: SweepConfig, rows: list[Row], device: torch.device, show_progress: bool) -> dict[str, Any]:
    """Generate every baseline training set a row needs and is missing; reuse one made with the same settings."""
    out: dict[str, Any] = {}
    for method in {r.method.name: r.method for r in rows}.values():
        if not method.baseline:
            continue
        train_dir = method_train_dir(cfg, method)
        bcfg = BaselineConfig(
            method=method.baseline, in_dir=cfg.data.clean_train, out_dir=train_dir, eps=method.eps, seed=cfg.seed,
            size=cfg.train.size, surrogate=cfg.surrogate, surrogate_small_stem=cfg.train.small_stem, device=str(device),
            options=dict(method.options),
        )  # fmt: skip
        if baseline_is_complete(train_dir):
            _check_same_baseline(read_json(Path(train_dir) / BASELINE_STATS), bcfg)
        else:
            write_baseline(bcfg, show_progress)
        out[method.name] = read_json(Path(train_dir) / BASELINE_STATS)
    return out


def _check_same_baseline(stats: dict[str, Any], wanted: BaselineConfig) -> None:
    # A baseline set made with other settings must not be reused silently (e.g. 32 px noise for a 224 px sweep).
    have = stats.get("config", {})
    for name in ("method", "in_dir", "eps", "seed", "size", "options"):
        if have.get(name) != getattr(wanted, name):
            raise ValueError(
                f"{wanted.out_dir} was made with {name}={have.get(name)!r}, this sweep needs {getattr(wanted, name)!r}; "
                "delete it or point the method's `train` elsewhere (paths may contain {size})"
            )


def run_sweep(cfg: SweepConfig, *, only: str = "", dry_run: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every row; returns the combined results (also written to <out>/results.json)."""
    rows = plan_rows(cfg, only)
    if not rows:
        raise ValueError(f"no row matches --only {only!r}")
    out = Path(cfg.out)
    _print_plan(cfg, rows, out)
    if dry_run:
        return {}
    _check_inputs(cfg, rows)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out, "sweep_config.yaml")
    device = _device(cfg.device)
    baselines = ensure_baselines(cfg, rows, device, show_progress)
    quality = _sweep_quality(cfg, rows, device) if cfg.quality else {}
    results = [_run_row(cfg, row, device, out, show_progress) for row in rows]
    combined = {
        "kind": "sweep",
        "name": cfg.name,
        "config": to_dict(cfg),
        "data": {"dataset": cfg.data.dataset, "clean_train": cfg.data.clean_train, "test": cfg.data.test},
        "methods": {
            m.name: {"train": method_train_dir(cfg, m), "baseline": m.baseline, "source": m.source, "time_s": m.time_s}
            for m in cfg.methods
        },
        "rows": results,
        "quality": quality,
        "baselines": baselines,
    }
    atomic_write_json(out / "results.json", combined)
    print_results_table(results, f"{cfg.name}: clean-test accuracy (chance {results[0]['chance']:.1f}%)")
    return combined


def _run_row(cfg: SweepConfig, row: Row, device: torch.device, out: Path, show_progress: bool) -> dict[str, Any]:
    path = out / "rows" / f"{row.name}.json"
    digest = _row_hash(cfg, row)
    if path.is_file():
        saved = read_json(path)
        if saved.get("row_hash") == digest:
            console.print(f"[dim]skip {row.name}: done ({saved['final_acc']:.1f}%)[/]")
            return saved
        console.print(f"[yellow]rerun {row.name}: its settings changed since {path} was written[/]")
    tags = {"dataset": cfg.data.dataset, "method": row.method.name, "sweep": cfg.name, "source": row.method.source}
    result = run_victim(
        arch=row.victim, train_dir=row.train_dir, test_dir=cfg.data.test, cfg=cfg.train, attack=row.attack,
        tags=tags, device=device, clean_train=cfg.data.clean_train, show_progress=show_progress,
    )  # fmt: skip
    result["row_hash"] = digest
    atomic_write_json(path, result)
    return result


def _sweep_quality(cfg: SweepConfig, rows: list[Row], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in {r.method.name: r.method for r in rows}.values():
        train_dir = method_train_dir(cfg, method)
        if method.name == "clean" or train_dir == cfg.data.clean_train:
            continue
        path = Path(cfg.out) / "quality" / f"{method.name}.json"
        if path.is_file() and read_json(path).get("protected") == train_dir:
            out[method.name] = read_json(path)
            continue
        result = run_quality(
            cfg.data.clean_train, train_dir, lpips_weights=cfg.lpips_weights, lpips_lin=cfg.lpips_lin, device=device
        )
        result.update(method=method.name, dataset=cfg.data.dataset)
        atomic_write_json(path, result)
        out[method.name] = result
    return out


def _print_plan(cfg: SweepConfig, rows: list[Row], out: Path) -> None:
    table = [[r.name, r.train_dir, "done" if (out / "rows" / f"{r.name}.json").is_file() else ""] for r in rows]
    print_table(f"sweep {cfg.name}: {len(rows)} rows -> {out}", ["row", "training set", "status"], table)


def print_results_table(results: list[dict[str, Any]], title: str) -> None:
    rows = [
        [r["name"], f"{r['final_acc']:.2f}", f"{r['chance']:.2f}", f"{r['x_chance']:.2f}", f"{r['wall_s']:.0f}"]
        for r in results
    ]
    print_table(title, ["row", "clean-test acc %", "chance %", "x chance", "wall s"], rows)


# ---------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    victim = sub.add_parser("victim", help="train a victim on a (protected) split, test on clean")
    victim.add_argument("--config", help="YAML with VictimRunConfig fields")
    victim.add_argument("--train", dest="train_dir", help="training split (protected)")
    victim.add_argument("--test", dest="test_dir", help="clean test split")
    victim.add_argument("--clean-train", help="clean training split (partial protection; the control)")
    victim.add_argument("--control", action="store_true", default=None, help="also train on --clean-train")
    victim.add_argument("--arch", help="resnet18 | resnet50 | mobilenet_v2 | inception_v3 | efficientnet_b1 | swin_t")
    victim.add_argument("--out", help="folder for the result JSON(s)")
    victim.add_argument("--device", help="cpu | cuda | cuda:1 (default: CUDA when present)")
    victim.add_argument(
        "overrides", nargs="*", default=[], help="key=value, e.g. train.epochs=8 attack.jpeg_quality=10"
    )

    base = sub.add_parser("baseline", help="write a baseline-protected copy of a training split")
    base.add_argument("--config", help="YAML with BaselineConfig fields")
    base.add_argument("--method", choices=list(BASELINE_METHODS))
    base.add_argument("--in", dest="in_dir", help="clean training split")
    base.add_argument("--out", dest="out_dir", help="output split folder")
    base.add_argument("--eps", help="L∞ budget in [0, 1] units, e.g. 8/255")
    base.add_argument("--seed", type=int)
    base.add_argument("--size", type=int, help="resize to this side first (default: as stored)")
    base.add_argument("--device")
    base.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. options.max_rounds=10")

    quality = sub.add_parser("quality", help="image quality of a protected split against its clean split (by key)")
    quality.add_argument("--clean", required=True)
    quality.add_argument("--protected", required=True)
    quality.add_argument("--lpips-weights", default="", help="local AlexNet ImageNet state dict (enables LPIPS)")
    quality.add_argument("--lpips-lin", default="", help="local LPIPS v0.1 lin weights (calibrated LPIPS)")
    quality.add_argument("--out", help="result JSON (default: <protected>/quality.json)")
    quality.add_argument("--device")

    sweep = sub.add_parser("sweep", help="every row of an experiment config, resumable")
    sweep.add_argument("--config", required=True, help="configs/experiments/<name>.yaml")
    sweep.add_argument("--only", default="", help="run the rows whose name matches this glob (method__victim__attack)")
    sweep.add_argument("--dry-run", action="store_true", help="print the rows and exit")
    sweep.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. train.size=224 train.epochs=60")


def _flag_overrides(args: argparse.Namespace, names: list[str]) -> list[str]:
    out = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out.append(f"{name}={value}")
    return out


def run(args: argparse.Namespace) -> int:
    return {"victim": _cli_victim, "baseline": _cli_baseline, "quality": _cli_quality, "sweep": _cli_sweep}[
        args.action
    ](args)


def _cli_victim(args: argparse.Namespace) -> int:
    flags = _flag_overrides(args, ["train_dir", "test_dir", "clean_train", "control", "arch", "out", "device"])
    cfg = load_config(VictimRunConfig, args.config, [*flags, *args.overrides])
    if not cfg.train_dir or not cfg.test_dir:
        raise ConfigError("evaluate victim needs --train and --test")
    if cfg.control and not cfg.clean_train:
        raise ConfigError("--control needs --clean-train")
    out = Path(cfg.out)
    save_resolved(cfg, out, "victim_config.yaml")
    device = _device(cfg.device)
    runs = [(cfg.method, cfg.train_dir)] + ([("clean", cfg.clean_train)] if cfg.control else [])
    results = []
    for method, train_dir in runs:
        attack = cfg.attack
        if method == "clean" and attack.protected_fraction < 1.0:
            attack = AttackerConfig(**{**asdict(attack), "protected_fraction": 1.0})
        tags = {"dataset": cfg.dataset, "method": method}
        result = run_victim(
            arch=cfg.arch,
            train_dir=train_dir,
            test_dir=cfg.test_dir,
            cfg=cfg.train,
            attack=attack,
            tags=tags,
            device=device,
            clean_train=cfg.clean_train,
        )
        atomic_write_json(out / f"{result['name']}.json", result)
        results.append(result)
    print_results_table(results, f"clean-test accuracy (chance {results[0]['chance']:.1f}%) -> {out}")
    return 0


def _cli_baseline(args: argparse.Namespace) -> int:
    cfg = load_config(
        BaselineConfig,
        args.config,
        [*_flag_overrides(args, ["method", "in_dir", "out_dir", "eps", "seed", "size", "device"]), *args.overrides],
    )
    if not cfg.in_dir or not cfg.out_dir:
        raise ConfigError("evaluate baseline needs --in and --out")
    stats = write_baseline(cfg)
    print_table(
        f"baseline {cfg.method} -> {cfg.out_dir}",
        ["samples", "eps /255", "max |δ| /255", "generation s", "total s"],
        [
            [
                str(stats["samples"]),
                f"{cfg.eps * 255:.2f}",
                str(stats["check"]["linf_255"]),
                f"{stats['generation_s']:.2f}",
                f"{stats['total_s']:.2f}",
            ]
        ],
    )
    return 0


def _cli_quality(args: argparse.Namespace) -> int:
    device = _device(args.device or "")
    result = run_quality(
        args.clean, args.protected, lpips_weights=args.lpips_weights, lpips_lin=args.lpips_lin, device=device
    )
    out = Path(args.out) if args.out else Path(args.protected) / "quality.json"
    atomic_write_json(out, result)
    m = result["metrics"]
    names = [n for n in ("psnr", "ssim", "ms_ssim", "lpips", "mae", "rmse", "linf_255") if n in m]
    print_table(f"image quality: {result['counts']['pairs']} pairs -> {out}", names, [[f"{m[n]:.4g}" for n in names]])
    for name, note in result["notes"].items():
        console.print(f"{name}: {note}")
    if result["counts"]["unpaired"] or result["counts"]["size_mismatch"]:
        console.print(
            f"[yellow]{result['counts']['unpaired']} unpaired, {result['counts']['size_mismatch']} size mismatches[/]"
        )
    return 0


def _cli_sweep(args: argparse.Namespace) -> int:
    cfg = load_config(SweepConfig, args.config, args.overrides)
    run_sweep(cfg, only=args.only, dry_run=args.dry_run)
    return 0


__all__ = [
    "BASELINE_METHODS",
    "BaselineConfig",
    "ImageSet",
    "MethodSpec",
    "SweepConfig",
    "VictimConfig",
    "VictimRunConfig",
    "image_quality_between",
    "iter_pairs",
    "load_image_set",
    "mix_partial",
    "prepare_data",
    "run_quality",
    "run_sweep",
    "run_victim",
    "train_victim",
    "verify_written",
    "write_baseline",
]
