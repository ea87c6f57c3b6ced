"""Train the Segue generator: Algorithm 1 of the paper, on any number of processes.

    accelerate launch -m segue_dist.train --config configs/train/lfw62.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m segue_dist.train --config ...        (same thing)
    segue train --config ...                                             (one process)

Epoch e trains the surrogate f when e % f_every == 1 (f learns to classify x + G(x) as ŷ), and the generator G
otherwise (G learns perturbations that make f's loss small even after the distortion layer, with an L2 penalty).
ŷ is the true label (`.cls`) or a pseudo-label from a sidecar. Training stops after `epochs` or when f's loss on the
unlearnable examples, averaged over the epoch and across ranks, falls below `stop_loss`.

Distributed: DDP through Accelerate (gloo on CPU, nccl on GPU), or two DeepSpeed engines (one per model) when the
Accelerate config or `deepspeed=` names a DeepSpeed JSON. The WebDataset stream is *not* passed to
`accelerator.prepare`: it already yields each rank its own fixed number of batches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from segue_dist.config import ConfigError, load_config, save_resolved, to_dict
from segue_dist.data.loader import TrainStream, batches_per_epoch_for, open_shard_set, train_loader
from segue_dist.data.sidecar import read_sidecar
from segue_dist.distortion import DistortionConfig, DistortionLayer
from segue_dist.models.classifiers import build_classifier
from segue_dist.models.generator import GeneratorConfig, SegueGenerator
from segue_dist.utils.io import atomic_write_json
from segue_dist.utils.progress import console, make_progress, print_table
from segue_dist.utils.seed import derive_seed, seed_everything

# ------------------------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    train: str = ""  # a split folder of shards, e.g. shards/lfw62/train
    labels: str = ""  # pseudo-label sidecar (key -> label); empty = true labels from .cls
    image_size: list[int] = field(default_factory=lambda: [64])  # [side] or [height, width]
    batch_size: int = 64  # per process
    samples_per_epoch: int = 0  # 0 = the size of the training set
    num_workers: int = 2
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        if len(self.image_size) not in (1, 2) or min(self.image_size) < 16:
            raise ValueError(f"data.image_size must be [side] or [height, width] >= 16, got {self.image_size}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")

    @property
    def size(self) -> tuple[int, int]:
        return (self.image_size[0], self.image_size[-1])


@dataclass
class SurrogateConfig:
    arch: str = "resnet18"
    pretrained: str = ""  # local weights file only; never downloaded
    small_stem: bool | None = None  # None = automatic (on for images <= 112 px)


@dataclass
class OptimConfig:
    lr_g: float = 5e-4
    lr_f: float = 5e-4
    weight_decay_f: float = 0.0
    schedule: str = "constant"  # constant | cosine | step (per epoch)
    alpha: float = 1.0  # weight of CE(f(distort(x + δ)), ŷ) in G's loss
    beta: float = 1e-3  # weight of E‖δ‖₂
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"optim.schedule must be constant, cosine or step, got {self.schedule!r}")


@dataclass
class TrainConfig:
    out: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    distortion: DistortionConfig = field(default_factory=DistortionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 20
    # alternate: Algorithm 1 as printed (an f epoch, then f_every - 1 G epochs against the frozen f).
    # joint: every step updates f and G together on one loss through the distortion layer (see joint_step).
    schedule: str = "alternate"
    f_every: int = 5  # alternate: epoch % f_every == 1 trains f; the other epochs train G (Algorithm 1)
    # joint: re-initialise f (fresh weights, fresh optimiser state) every this many epochs, 0 = never. A fresh f
    # learns what is easiest first, so G keeps being pushed toward what a victim trained from scratch picks up first.
    f_reset_every: int = 0
    stop_loss: float = 1e-3
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0 = at epoch ends only)
    resume: bool = True
    deepspeed: str = ""  # DeepSpeed JSON: train G and f as two DeepSpeed engines
    log_every: int = 10
    tensorboard: bool = True
    max_epochs_this_run: int = 0  # stop (resumably) after this many epochs; for tests and time-boxed jobs

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.f_every < 2:
            raise ValueError(f"f_every must be >= 2 (one f epoch then G epochs), got {self.f_every}")
        if self.f_reset_every < 0:
            raise ValueError(f"f_reset_every must be >= 0, got {self.f_reset_every}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


SCHEDULES = ("alternate", "joint")


def stage_of(epoch: int, f_every: int, schedule: str = "alternate") -> str:
    """Algorithm 1: epoch % 5 == 1 trains f, the others train G (epochs count from 1); every epoch is joint in joint."""
    if schedule == "joint":
        return "joint"
    return "f" if epoch % f_every == 1 else "g"


# --------------------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where this process stands in the job and what it computes with."""

    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    accelerator: Any = None  # accelerate.Accelerator in DDP mode
    deepspeed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def mean_across_ranks(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def deepspeed_requested(cfg: TrainConfig) -> str:
    """The DeepSpeed JSON to use: `deepspeed=` in the config, or the one an Accelerate DeepSpeed config names."""
    if cfg.deepspeed:
        return cfg.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if not path:
            raise ConfigError("the Accelerate config enables DeepSpeed but names no deepspeed_config_file")
        return path
    return ""


def make_runtime(cfg: TrainConfig) -> Runtime:
    cuda = torch.cuda.is_available()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if deepspeed_requested(cfg):
        import deepspeed

        disable_deepspeed_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return Runtime(rank, world, device, torch.bfloat16 if use_bf16 else None, deepspeed=True)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # broadcast_buffers=False: BatchNorm buffers are re-broadcast on every forward otherwise, which breaks the
    # second forward of a step (the PGD distortion runs f before the loss does).
    accelerator = Accelerator(
        mixed_precision="no",
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        cpu=not cuda,
    )
    return Runtime(
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.device,
        torch.bfloat16 if use_bf16 else None,
        accelerator=accelerator,
    )


def disable_deepspeed_shm_build() -> None:
    """Skip DeepSpeed's shared-memory CPU all-reduce op unless asked (SEGUE_DS_SHM_COMM=1).

    On CPU, DeepSpeed compiles it with ninja on first use (minutes, and needs a compiler on every node);
    gloo's all-reduce is correct without it and fast enough for CPU rehearsals.
    """
    if os.environ.get("SEGUE_DS_SHM_COMM", "0") == "1" or torch.cuda.is_available():
        return
    import deepspeed.ops as ds_ops

    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ------------------------------------------------------------------------------------------------ model runners


class Runner:
    """One trainable model with its optimiser: DDP via Accelerate or a DeepSpeed engine, behind one interface."""

    def __init__(
        self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, ds_config: dict | None
    ):
        self.name = name
        self.rt = rt
        if ds_config is not None:
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            self.wrapped: nn.Module = self.engine
            self.module: nn.Module = self.engine.module
        else:
            self.engine = None
            self.wrapped, self.optimizer = rt.accelerator.prepare(model, optimizer)
            self.module = rt.accelerator.unwrap_model(self.wrapped)
        self.base_optimizer = optimizer

    def backward_and_step(self, loss: torch.Tensor, grad_clip: float) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        self.rt.accelerator.backward(loss)
        if grad_clip > 0:
            self.rt.accelerator.clip_grad_norm_(self.wrapped.parameters(), grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr


def ds_config_for(path: str, cfg: TrainConfig, rt: Runtime) -> dict:
    """Fill the DeepSpeed JSON's "auto" values from the training config."""
    with open(path, encoding="utf-8") as fh:
        ds = json.load(fh)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.data.batch_size * rt.world_size
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip
    bf16 = rt.autocast_dtype == torch.bfloat16
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    # We autocast ourselves; engines keep fp32 master weights on CPU where bf16 kernels are slow.
    if not torch.cuda.is_available():
        ds.setdefault("bf16", {})["enabled"] = False
        ds.setdefault("fp16", {})["enabled"] = False
    return ds


# ----------------------------------------------------------------------------------------------------- building


def resolve_labels(cfg: TrainConfig) -> tuple[dict[str, int] | None, int, dict[str, int], str]:
    """(key -> pseudo-label or None for .cls, K, identity label map, label source)."""
    shard_set = open_shard_set(cfg.data.train)
    if cfg.data.labels:
        label_map, k = read_sidecar(cfg.data.labels)
        return label_map, k, {}, f"pseudo:{cfg.data.labels}"
    if not shard_set.labels:
        raise ConfigError(f"{cfg.data.train} has no labels.json; give data.labels=<pseudo-label sidecar>")
    return None, shard_set.num_classes, shard_set.labels, "cls"


def build_models(cfg: TrainConfig, num_classes: int) -> tuple[SegueGenerator, nn.Module]:
    gen_cfg = dataclasses.replace(cfg.generator, num_classes=num_classes)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank, before DDP even broadcasts them
    generator = SegueGenerator(gen_cfg)
    surrogate = build_classifier(
        cfg.surrogate.arch,
        num_classes,
        image_size=cfg.data.size,
        pretrained=cfg.surrogate.pretrained or None,
        small_stem=cfg.surrogate.small_stem,
    )
    return generator, surrogate


def resets_surrogate(epoch: int, cfg: TrainConfig) -> bool:
    """Whether epoch ``epoch`` (from 1) starts with a fresh surrogate (joint schedule, ``f_reset_every``)."""
    every = cfg.f_reset_every
    return cfg.schedule == "joint" and every > 0 and epoch > 1 and (epoch - 1) % every == 0


@torch.no_grad()
def reset_surrogate(f: Runner, cfg: TrainConfig, num_classes: int, epoch: int) -> None:
    """Fresh weights for f (seeded by (seed, epoch), so every rank and a resumed run draw the same) and empty Adam
    state. The parameters are copied in place: DDP and the optimiser keep pointing at the same tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "f-reset", epoch))
        fresh = build_classifier(
            cfg.surrogate.arch, num_classes, image_size=cfg.data.size, small_stem=cfg.surrogate.small_stem
        )
    f.module.load_state_dict(fresh.state_dict())
    f.base_optimizer.state.clear()


def lr_at(epoch: int, base: float, cfg: TrainConfig) -> float:
    """Per-epoch schedule (epochs count from 1)."""
    if cfg.optim.schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    if cfg.optim.schedule == "step":
        return base * (0.1 ** ((epoch - 1) // max(1, cfg.epochs // 3)))
    return base


# ----------------------------------------------------------------------------------------------------- the steps


def to_float_images(images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    x = images.to(rt.device, non_blocking=True).float().div_(255.0)
    if rt.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def f_step(g: Runner, f: Runner, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, rt: Runtime) -> float:
    """Train f to classify the unlearnable example x + clip(G(x)) as ŷ; G is fixed."""
    with torch.no_grad(), rt.autocast():
        delta = g.module(x, y).float()
    x_ue = (x + delta).clamp_(0, 1)
    f.wrapped.train()
    with rt.autocast():
        loss = F.cross_entropy(f.wrapped(x_ue).float(), y)
    f.backward_and_step(loss, cfg.optim.grad_clip)
    return loss.item()


def g_step(
    g: Runner,
    f: Runner,
    distortion: DistortionLayer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    rt: Runtime,
    rng: torch.Generator,
) -> tuple[float, float, float]:
    """Train G so f (frozen, eval mode) classifies distort(x + δ) as ŷ with small ‖δ‖₂. Returns (loss, CE, ‖δ‖₂)."""
    f.module.eval()  # frozen f: running stats stay put, and no DDP buffer sync on the unwrapped module
    g.wrapped.train()
    loss, ce, l2 = error_minimising_loss(g, f.module, f.module, distortion, x, y, cfg, rt, rng)
    g.backward_and_step(loss, cfg.optim.grad_clip)
    return loss.item(), ce.item(), l2.item()


def error_minimising_loss(
    g: Runner,
    classify: nn.Module,
    surrogate: nn.Module,
    distortion: DistortionLayer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    rt: Runtime,
    rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α·CE(classify(T(x + δ)), ŷ) + β·E‖δ‖₂, CE, E‖δ‖₂) with δ = G(x, ŷ); ``surrogate`` is what T's PGD attacks.

    ``classify`` is f's DDP wrapper when f learns from the loss (joint), the plain module when it is frozen.
    """
    with rt.autocast():
        delta = g.wrapped(x, y).float()
    x_seen = distortion((x + delta).clamp(0, 1), model=surrogate, labels=y, generator=rng)
    with rt.autocast():
        ce = F.cross_entropy(classify(x_seen).float(), y)
    l2 = delta.flatten(1).norm(dim=1).mean()
    return cfg.optim.alpha * ce + cfg.optim.beta * l2, ce, l2


def joint_step(
    g: Runner,
    f: Runner,
    distortion: DistortionLayer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    rt: Runtime,
    rng: torch.Generator,
) -> tuple[float, float, float]:
    """One step of both players on one loss: α·CE(f(T(x + δ)), ŷ) + β·E‖δ‖₂, f in train mode. Returns (loss, CE, ‖δ‖₂).

    The error-minimising objective of Algorithm 1 with the two minimisations taken together (as in unlearnable
    examples' min-min, Huang et al. 2021, but one step each): f learns from the distorted protected batch while G
    moves δ toward what a network that is still learning picks up first. Measured on glint24 32 px (README,
    Effectiveness): within 8 epochs f reads δ at 90% where the alternate schedule's G stays near chance.
    """
    if rt.deepspeed:
        raise ConfigError("schedule=joint needs the DDP runner: DeepSpeed engines step one model per backward")
    f.wrapped.train()
    g.wrapped.train()
    loss, ce, l2 = error_minimising_loss(g, f.wrapped, f.module, distortion, x, y, cfg, rt, rng)
    rt.accelerator.backward(loss)
    for runner in (g, f):
        if cfg.optim.grad_clip > 0:
            rt.accelerator.clip_grad_norm_(runner.wrapped.parameters(), cfg.optim.grad_clip)
        runner.optimizer.step()
        runner.optimizer.zero_grad(set_to_none=True)
    return loss.item(), ce.item(), l2.item()


def average_buffers(module: nn.Module, rt: Runtime) -> None:
    """Average BatchNorm running statistics across ranks (timm's `distribute_bn`).

    DDP runs with broadcast_buffers=False, so each rank's running stats follow its own data; f is used in eval
    mode during G epochs, and it must be the same function on every rank (and in a resumed run, which loads one
    copy of the buffers).
    """
    if rt.world_size == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            reduced = buf.detach().to(rt.comm_device, dtype=torch.float64)
            dist.all_reduce(reduced)
            buf.copy_(reduced.div_(rt.world_size).to(buf.device, buf.dtype))


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------ checkpointing


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoints"


def save_checkpoint(
    g: Runner, f: Runner, position: dict[str, int], rng: torch.Generator, cfg: TrainConfig, rt: Runtime
) -> None:
    """Exact-resume state. DDP: one pickle-free safetensors + JSON written by rank 0. DeepSpeed: its own format."""
    from segue_dist.checkpoint import capture_rng, flatten_state, rng_to_tensors, save_state

    rng_states = gather_rng_states(rng, rt)
    rank_buffers = gather_rank_buffers(f.module, rt)
    ckpt = checkpoint_dir(cfg)
    if rt.deepspeed:
        tag = "last"
        for runner in (g, f):
            runner.engine.save_checkpoint(str(ckpt / runner.name), tag=tag, client_state={})
        if rt.is_main:
            atomic_write_json(ckpt / "position.json", {**position, "rng_states": rng_states.tolist()})
        return
    if not rt.is_main:
        return
    tensors: dict[str, torch.Tensor] = {}
    for name, runner in (("g", g), ("f", f)):
        for key, value in runner.module.state_dict().items():
            tensors[f"{name}.model.{key}"] = value
    skeleton = {
        "g_optim": flatten_state("g.optim", g.base_optimizer.state_dict(), tensors),
        "f_optim": flatten_state("f.optim", f.base_optimizer.state_dict(), tensors),
    }
    rng_tensors, rng_meta = rng_to_tensors(capture_rng())
    tensors.update(rng_tensors)
    tensors["distortion_rng"] = rng_states
    tensors.update(rank_buffers)
    save_state(
        ckpt / "last", tensors, {"position": position, "optim": skeleton, "rng": rng_meta, "world_size": rt.world_size}
    )


def gather_rng_states(rng: torch.Generator, rt: Runtime) -> torch.Tensor:
    """Every rank's distortion RNG state, stacked (rank order), so each rank resumes its own random stream."""
    state = rng.get_state()
    if rt.world_size == 1:
        return state.unsqueeze(0)
    local = state.to(rt.comm_device)
    gathered = [torch.empty_like(local) for _ in range(rt.world_size)]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).cpu()


def gather_rank_buffers(module: nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """Each rank's own BatchNorm statistics: inside an f epoch they differ by rank until the epoch-end average."""
    out: dict[str, torch.Tensor] = {}
    if rt.world_size == 1:
        return out
    for name, buf in module.named_buffers():
        if not buf.is_floating_point():
            continue
        local = buf.detach().to(rt.comm_device)
        gathered = [torch.empty_like(local) for _ in range(rt.world_size)]
        dist.all_gather(gathered, local)
        for r, value in enumerate(gathered):
            out[f"f.rank{r}.{name}"] = value.cpu()
    return out


def load_checkpoint(g: Runner, f: Runner, rng: torch.Generator, cfg: TrainConfig, rt: Runtime) -> dict[str, int] | None:
    from segue_dist.checkpoint import load_state, load_state_strict, restore_rng, unflatten_state
    from segue_dist.utils.io import read_json

    ckpt = checkpoint_dir(cfg)
    if rt.deepspeed:
        if not (ckpt / "position.json").is_file():
            return None
        for runner in (g, f):
            runner.engine.load_checkpoint(str(ckpt / runner.name), tag="last")
        meta = read_json(ckpt / "position.json")
        rng.set_state(torch.tensor(meta["rng_states"][rt.rank], dtype=torch.uint8))
        return {k: v for k, v in meta.items() if k != "rng_states"}
    if not (ckpt / "last.json").is_file():
        return None
    tensors, meta = load_state(ckpt / "last")
    if meta["world_size"] != rt.world_size:
        raise ConfigError(
            f"checkpoint was written by {meta['world_size']} processes, this run has {rt.world_size}: "
            "an exact resume needs the same world size (or start fresh with resume=false)"
        )
    for name, runner in (("g", g), ("f", f)):
        prefix = f"{name}.model."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_state_strict(runner.module, state, f"checkpoint {name}")
        runner.base_optimizer.load_state_dict(unflatten_state(meta["optim"][f"{name}_optim"], tensors))
    restore_rng(tensors, meta["rng"])
    rng.set_state(tensors["distortion_rng"][rt.rank].clone())
    with torch.no_grad():
        for name, buf in f.module.named_buffers():
            own = tensors.get(f"f.rank{rt.rank}.{name}")
            if own is not None:
                buf.copy_(own)
    return meta["position"]


# ------------------------------------------------------------------------------------------------------- logging


class Logger:
    """Rank 0 writes metrics.jsonl and TensorBoard; other ranks are silent."""

    def __init__(self, cfg: TrainConfig, rt: Runtime):
        self.enabled = rt.is_main
        self.path = Path(cfg.out) / "metrics.jsonl"
        self.tb = None
        if self.enabled and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.out) / "tb"))
            except ImportError:
                self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run Algorithm 1; returns the summary (epochs run, final losses, where the generator was exported)."""
    rt = make_runtime(cfg)
    seed_everything(cfg.seed)
    label_map, num_classes, identity_labels, label_source = resolve_labels(cfg)
    shard_set = open_shard_set(cfg.data.train)
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
    g = Runner("g", generator, opt_g, rt, ds_cfg)
    f = Runner("f", surrogate, opt_f, rt, ds_cfg)
    distortion = DistortionLayer(cfg.distortion).to(rt.device)
    rng = torch.Generator(device="cpu")
    rng.manual_seed(derive_seed(cfg.seed, "distortion", rt.rank))

    out = Path(cfg.out)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
    position = load_checkpoint(g, f, rng, cfg, rt) if cfg.resume else None
    start_epoch, skip = (position["epoch"], position["batch"]) if position else (1, 0)
    step = position["step"] if position else 0

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
        label_map=label_map,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    logger = Logger(cfg, rt)
    history: list[dict[str, Any]] = []
    if rt.is_main:
        console.print(
            f"[bold]segue train[/]: {shard_set.num_samples} samples, K={num_classes} ({label_source}), "
            f"{rt.world_size} process(es) on {rt.device.type}{' with DeepSpeed' if rt.deepspeed else ''}, "
            f"{batches} batches of {cfg.data.batch_size} per process per epoch"
        )
    stop_reason, epochs_this_run = "epochs", 0
    epoch = start_epoch
    with make_progress(disable=not rt.is_main) as progress:
        task = progress.add_task("train", total=(cfg.epochs - start_epoch + 1) * batches, completed=skip)
        for epoch in range(start_epoch, cfg.epochs + 1):
            stage = stage_of(epoch, cfg.f_every, cfg.schedule)
            if skip == 0 and resets_surrogate(epoch, cfg):  # mid-epoch resume: the reset is in the checkpoint
                reset_surrogate(f, cfg, num_classes, epoch)
            if stage != "g":
                f.set_lr(lr_at(epoch, cfg.optim.lr_f, cfg))
            if stage != "f":
                g.set_lr(lr_at(epoch, cfg.optim.lr_g, cfg))
            set_requires_grad(f.module, stage != "g")
            set_requires_grad(g.module, stage != "f")
            stream.set_epoch(epoch, skip_batches=skip)
            sums = {"loss": 0.0, "ce": 0.0, "l2": 0.0, "skipped": 0.0}
            seen = 0
            t0 = time.perf_counter()
            for batch_index, (images, labels, skipped) in enumerate(
                train_loader(stream, cfg.data.num_workers), start=skip
            ):
                x, y = to_float_images(images, rt), labels.to(rt.device, non_blocking=True)
                if stage == "f":
                    loss = f_step(g, f, x, y, cfg, rt)
                    ce, l2 = loss, 0.0
                elif stage == "joint":
                    loss, ce, l2 = joint_step(g, f, distortion, x, y, cfg, rt, rng)
                else:
                    loss, ce, l2 = g_step(g, f, distortion, x, y, cfg, rt, rng)
                step += 1
                seen += 1
                for key, value in (("loss", loss), ("ce", ce), ("l2", l2), ("skipped", float(skipped))):
                    sums[key] += value
                progress.update(task, advance=1, info=f"epoch {epoch} {stage}-stage loss {loss:.4f}")
                if step % cfg.log_every == 0:
                    logger.log(step, {f"{stage}/loss": loss, f"{stage}/ce": ce, f"{stage}/l2": l2, "epoch": epoch})
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batch_index + 1 < batches:
                    save_checkpoint(g, f, {"epoch": epoch, "batch": batch_index + 1, "step": step}, rng, cfg, rt)
            if stage != "g":
                average_buffers(f.module, rt)
            # Ranks see the same number of batches, so these means are over the same count everywhere.
            n = max(seen, 1)
            mean_loss, mean_ce, mean_l2, mean_skipped = rt.mean_across_ranks(
                [sums["loss"] / n, sums["ce"] / n, sums["l2"] / n, sums["skipped"]]
            )
            seconds = time.perf_counter() - t0
            record = {
                "epoch": epoch,
                "stage": stage,
                "loss": mean_loss,
                "f_ce_on_unlearnable": mean_ce,
                "delta_l2": mean_l2,
                "skipped_samples": mean_skipped * rt.world_size,
                "samples_per_s": seen * cfg.data.batch_size * rt.world_size / max(seconds, 1e-9),
            }
            history.append(record)
            logger.log(step, {f"epoch/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
            skip = 0
            save_checkpoint(g, f, {"epoch": epoch + 1, "batch": 0, "step": step}, rng, cfg, rt)
            epochs_this_run += 1
            if mean_ce < cfg.stop_loss:
                stop_reason = f"f's loss on unlearnable examples {mean_ce:.2e} < {cfg.stop_loss:g}"
                break
            if cfg.max_epochs_this_run and epochs_this_run >= cfg.max_epochs_this_run and epoch < cfg.epochs:
                stop_reason = "paused (max_epochs_this_run)"
                break
    logger.close()
    summary = finish(g, cfg, rt, history, stop_reason, epoch, step, identity_labels, label_map, label_source)
    if rt.world_size > 1:
        dist.barrier()
    return summary


def parameter_checksum(module: nn.Module) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()


def ranks_in_sync(g: Runner, rt: Runtime) -> bool:
    """All ranks hold bit-identical generator weights (DDP/ZeRO should guarantee it; we check, cheaply)."""
    local = parameter_checksum(g.module)
    if rt.world_size == 1:
        return True
    gathered = [torch.empty_like(local.to(rt.comm_device)) for _ in range(rt.world_size)]
    dist.all_gather(gathered, local.to(rt.comm_device))
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def finish(
    g: Runner,
    cfg: TrainConfig,
    rt: Runtime,
    history: list[dict[str, Any]],
    stop_reason: str,
    epoch: int,
    step: int,
    identity_labels: dict[str, int],
    label_map: dict[str, int] | None,
    label_source: str,
) -> dict[str, Any]:
    """Export the generator (rank 0), print the per-epoch table, and return the summary."""
    from segue_dist.checkpoint import export_generator, label_map_hash

    summary: dict[str, Any] = {
        "stop_reason": stop_reason,
        "last_epoch": epoch,
        "steps": step,
        "world_size": rt.world_size,
        "deepspeed": rt.deepspeed,
        "history": history,
        "ranks_in_sync": ranks_in_sync(g, rt),
    }
    if not rt.is_main:
        return summary
    exported = stop_reason != "paused (max_epochs_this_run)"
    if exported:
        weights = export_generator(
            g.module,
            cfg.out,
            label_map=identity_labels,
            label_source=label_source,
            train_config=to_dict(cfg),
            extra={"pseudo_labels_sha256": label_map_hash(label_map) if label_map else "", "epochs_run": epoch},
        )
        summary["generator"] = str(weights)
    atomic_write_json(Path(cfg.out) / "train_summary.json", summary)
    rows = [
        [
            str(r["epoch"]),
            r["stage"],
            f"{r['loss']:.4f}",
            f"{r['f_ce_on_unlearnable']:.4f}",
            f"{r['delta_l2']:.3f}",
            f"{r['samples_per_s']:.0f}",
        ]
        for r in history
    ]
    print_table("segue train", ["epoch", "stage", "loss", "f CE on UE", "‖δ‖₂", "samples/s"], rows)
    console.print(f"stopped: {stop_reason}" + (f"; generator: {summary['generator']}" if exported else ""))
    return summary


# ------------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML with TrainConfig fields (see configs/train/)")
    parser.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides, e.g. data.batch_size=32")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if not cfg.data.train:
        raise ConfigError("data.train is empty: name a shard split folder, e.g. data.train=shards/lfw62/train")
    train(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from segue_dist.cli import stage_main

    return stage_main("train", argv)


if __name__ == "__main__":
    sys.exit(main())
