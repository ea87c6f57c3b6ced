"""Everything a training run needs before its first epoch: ŷ, G and f behind their runners, the distortion layer and
its RNG, and this rank's data stream."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from segue_dist.config import ConfigError
from segue_dist.data.loader import TrainStream, batches_per_epoch_for, open_shard_set
from segue_dist.data.sidecar import read_sidecar
from segue_dist.distortion import DistortionLayer
from segue_dist.models.classifiers import build_classifier
from segue_dist.models.generator import SegueGenerator
from segue_dist.models.surrogate import GrayscaleTwin
from segue_dist.training.config import TrainConfig
from segue_dist.training.runtime import Runner, Runtime, deepspeed_requested, ds_config_for, make_runtime
from segue_dist.utils.device import capped_workers, cpus_per_process
from segue_dist.utils.seed import derive_seed, seed_everything


@dataclass
class SideInformation:
    """Where ŷ comes from (paper, section III-A: true labels, or pseudo-labels when the owner has none)."""

    pseudo_labels: dict[str, int] | None  # sample key -> pseudo-label; None = the shards' own `.cls`
    num_classes: int  # K
    identity_labels: dict[str, int]  # identity name -> label of the shards' labels.json ({} for pseudo-labels)
    source: str  # "cls" or "pseudo:<sidecar path>"


@dataclass
class TrainingSetup:
    """One rank's players and data for Algorithm 1."""

    rt: Runtime
    g: Runner
    f: Runner
    distortion: DistortionLayer
    rng: torch.Generator  # the distortion layer's, seeded per rank (and restored per rank on resume)
    stream: TrainStream
    batches: int  # batches per epoch per rank
    num_samples: int  # in the training shards
    side_info: SideInformation
    # Loader worker processes per rank: data.num_workers, capped to this rank's share of the node's cores
    # (`capped_workers`) and to the batches of an epoch. The batch stream depends on it (segue_dist/data/loader.py);
    # the run's banner says what it is and why.
    workers: int = 0
    workers_note: str = ""


def resolve_side_info(cfg: TrainConfig) -> SideInformation:
    """ŷ: the sidecar named by ``data.labels``, else the shards' ``.cls`` (ConfigError when they have none)."""
    shard_set = open_shard_set(cfg.data.train)
    if cfg.data.labels:
        label_map, k = read_sidecar(cfg.data.labels)
        return SideInformation(label_map, k, {}, f"pseudo:{cfg.data.labels}")
    if not shard_set.labels:
        raise ConfigError(f"{cfg.data.train} has no labels.json; give data.labels=<pseudo-label sidecar>")
    return SideInformation(None, shard_set.num_classes, shard_set.labels, "cls")


def build_surrogate(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """f as configured (``surrogate.*``): one classifier, or a `GrayscaleTwin` of two (colour, then grayscale, drawn
    in that order from torch's RNG); ``pretrained=False`` ignores ``surrogate.pretrained`` (fresh weights)."""

    def classifier() -> nn.Module:
        return build_classifier(
            cfg.surrogate.arch,
            num_classes,
            image_size=cfg.data.size,
            pretrained=(cfg.surrogate.pretrained or None) if pretrained else None,
            small_stem=cfg.surrogate.small_stem,
        )

    if cfg.surrogate.grayscale_twin:
        colour = classifier()
        return GrayscaleTwin(colour, classifier())
    return classifier()


def build_models(cfg: TrainConfig, num_classes: int) -> tuple[SegueGenerator, nn.Module]:
    """(G, f) with weights drawn from ``cfg.seed``: identical on every rank before DDP even broadcasts them."""
    gen_cfg = dataclasses.replace(cfg.generator, num_classes=num_classes)
    torch.manual_seed(cfg.seed)
    generator = SegueGenerator(gen_cfg)
    return generator, build_surrogate(cfg, num_classes)


def build_runners(cfg: TrainConfig, rt: Runtime, num_classes: int) -> tuple[Runner, Runner]:
    """G and f with their Adam optimisers, wrapped for DDP or as two DeepSpeed engines."""
    generator, surrogate = build_models(cfg, num_classes)
    if rt.device.type == "cuda":
        generator = generator.to(memory_format=torch.channels_last)
        surrogate = surrogate.to(memory_format=torch.channels_last)
    ds_path = deepspeed_requested(cfg)
    ds_cfg = ds_config_for(ds_path, cfg, rt) if ds_path else None
    if ds_cfg is not None:
        generator, surrogate = generator.to(rt.device), surrogate.to(rt.device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.optim.lr_g)
    opt_f = torch.optim.Adam(surrogate.parameters(), lr=cfg.optim.lr_f, weight_decay=cfg.optim.weight_decay_f)
    return Runner("g", generator, opt_g, rt, ds_cfg), Runner("f", surrogate, opt_f, rt, ds_cfg)


def setup_training(cfg: TrainConfig) -> TrainingSetup:
    """Join the job, seed, resolve ŷ, build G, f, the distortion layer and this rank's stream."""
    rt = make_runtime(cfg)
    seed_everything(cfg.seed)
    side_info = resolve_side_info(cfg)
    shard_set = open_shard_set(cfg.data.train)
    g, f = build_runners(cfg, rt, side_info.num_classes)
    distortion = DistortionLayer(cfg.distortion).to(rt.device)
    rng = torch.Generator(device="cpu")
    rng.manual_seed(derive_seed(cfg.seed, "distortion", rt.rank))
    batches = batches_per_epoch_for(
        shard_set.num_samples, rt.world_size, cfg.data.batch_size, cfg.data.samples_per_epoch
    )
    stream = TrainStream(
        shard_set,
        batch_size=cfg.data.batch_size,
        batches_per_epoch=batches,
        rank=rt.rank,
        world_size=rt.world_size,
        seed=cfg.seed,
        image_size=cfg.data.size,
        label_map=side_info.pseudo_labels,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    workers, note = loader_workers(cfg.data.num_workers, batches)
    return TrainingSetup(rt, g, f, distortion, rng, stream, batches, shard_set.num_samples, side_info, workers, note)


def loader_workers(requested: int, batches: int) -> tuple[int, str]:
    """(loader workers per rank, why when that is fewer than ``requested``): never more than the rank's share of
    the cores, nor more than the batches of an epoch (a worker without a batch would only cost a process)."""
    cores = capped_workers(requested)
    workers = min(cores, batches)
    if workers == requested:
        return workers, ""
    if cores < requested:
        return workers, f"data.num_workers={requested} capped to the {cpus_per_process()} CPU(s) per process"
    return workers, f"data.num_workers={requested} capped to the {batches} batch(es) per epoch"
