"""Train the Segue generator G against a surrogate f: Algorithm 1 of the paper (section III-D), on any number of ranks.

    accelerate launch -m segue_dist.train --config configs/train/default.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m segue_dist.train --config ...        (same thing)
    segue train --config ...                                             (one process)

Both players minimise one error (paper, Eq. 3): α·CE(f(T(x + δ)), ŷ) + β·E‖δ‖₂ with δ = G(x, ŷ), |δ| ≤ ε, T the
distortion layer and ŷ the true label (`.cls`) or a pseudo-label from a sidecar (`data.labels`).
`schedule: alternate` is Algorithm 1 as printed: epoch e trains f when e % f_every == 1 (`f_step`, f learns to classify
x + δ as ŷ) and G otherwise (`g_step`, against the frozen f). `schedule: joint` takes one step of both on every batch
(`joint_step`). Training stops after `epochs`, or when f's loss on the unlearnable examples (an epoch in which f
trains, averaged across ranks) falls below `stop_loss`. Started again on the `out` of a finished run, it prints one
line and writes nothing; more `epochs`, or a `stop_loss` below the loss it stopped at, continue it.

This module is the algorithm: `train` (resume, the epoch loop, finish), then the steps and the schedule. The plumbing
lives in segue_dist/training/: config, runtime (DDP / DeepSpeed `Runner`), build, run_state (where a run stands, why
it stops), resume (exact-resume checkpoints), history (records, metrics.jsonl), summary (export, table).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segue_dist.config import ConfigError, load_config, save_resolved
from segue_dist.data.loader import train_loader
from segue_dist.distortion import DistortionLayer
from segue_dist.ops.losses import view_cross_entropy
from segue_dist.training.build import TrainingSetup, build_models, build_surrogate, resolve_side_info, setup_training
from segue_dist.training.config import (
    SCHEDULES,
    DataConfig,
    OptimConfig,
    SurrogateConfig,
    TrainConfig,
    distortion_at,
)
from segue_dist.training.history import EpochMeter, Logger, StepLosses
from segue_dist.training.resume import load_checkpoint, save_checkpoint
from segue_dist.training.run_state import RunState
from segue_dist.training.runtime import Runner, Runtime, average_buffers, make_runtime, to_float_images
from segue_dist.training.summary import finish
from segue_dist.utils.dist import is_main
from segue_dist.utils.io import read_json
from segue_dist.utils.progress import console, make_progress
from segue_dist.utils.seed import derive_seed


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run Algorithm 1 (resuming from the last checkpoint when ``cfg.resume``); returns the summary: epochs run,
    per-epoch history (segue_dist/training/history.py), stop reason, where the generator was exported.

    A run whose last checkpoint finished it (`RunState.finished`) is left as it is: one line says so and the summary
    it wrote is returned, no file is written. If its export is missing (killed after the last checkpoint), G is
    exported from that checkpoint without training.
    """
    run = RunState.saved(cfg)
    if run.finished and run.exported(cfg):
        if is_main():
            console.print(run.finished_line(cfg), soft_wrap=True, highlight=False, markup=False)
        return read_json(Path(cfg.out) / "train_summary.json")
    s = setup_training(cfg)
    if s.rt.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, cfg.out)
    if cfg.resume:
        load_checkpoint(s.g, s.f, s.rng, cfg, s.rt)  # the weights, optimisers and RNGs at `run`'s position
    logger, history = Logger(cfg, s.rt), []
    if s.rt.is_main:
        print_banner(s, cfg, run)
    with make_progress(disable=not s.rt.is_main or not run.epochs_left(cfg)) as progress:
        task = progress.add_task("train", total=run.epochs_left(cfg) * s.batches, completed=run.resume_batches)
        while run.epochs_left(cfg):  # Algorithm 1, line 1
            stage = stage_of(run.epoch, cfg.f_every, cfg.schedule)
            begin_epoch(s, cfg, run.epoch, stage, resumed_mid_epoch=run.resume_batches > 0)
            record = run_epoch(s, cfg, run, stage, logger, lambda info: progress.update(task, advance=1, info=info))
            history.append(record)
            logger.log_epoch(run.step, record)
            run.end_epoch(record, cfg)  # the stop rule
            save_checkpoint(s.g, s.f, run.position(), s.rng, cfg, s.rt)
    logger.close()
    return finish(s.g, cfg, s.rt, history, run, s.side_info)


def run_epoch(
    s: TrainingSetup, cfg: TrainConfig, run: RunState, stage: str, logger: Logger, advance: Callable[[str], None]
) -> dict[str, Any]:
    """One epoch of ``stage`` from ``run``'s position (a resumed run fast-forwards past ``run.resume_batches``),
    counting ``run.step``; returns its history record. Checkpoints every ``checkpoint_every`` steps inside the
    epoch; the epoch-end checkpoint is the caller's."""
    meter = EpochMeter(stage)
    s.stream.set_epoch(run.epoch, skip_batches=run.resume_batches)
    t0 = time.perf_counter()
    batches = enumerate(train_loader(s.stream, s.workers), start=run.resume_batches)
    for batch_index, (images, labels, skipped_samples) in batches:
        x, y = to_float_images(images, s.rt), labels.to(s.rt.device, non_blocking=True)  # Algorithm 1, lines 3/10
        losses = take_step(stage, s, x, y, cfg)
        run.step += 1
        meter.add(losses, skipped_samples)
        advance(f"epoch {run.epoch} {stage}-stage loss {losses.loss:.4f}")
        if run.step % cfg.log_every == 0:
            logger.log(run.step, {**losses.logged(stage), "epoch": run.epoch})
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and batch_index + 1 < s.batches:
            save_checkpoint(s.g, s.f, run.position(batch=batch_index + 1), s.rng, cfg, s.rt)
    if stage != "g":
        average_buffers(s.f.module, s.rt)  # f must be one function on every rank before G trains against it
    return meter.record(run.epoch, s.rt, cfg.data.batch_size, time.perf_counter() - t0)


def take_step(stage: str, s: TrainingSetup, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> StepLosses:
    """The step of ``stage`` on one batch, its losses named as in the history record."""
    if stage == "f":
        ce = f_step(s.g, s.f, x, y, cfg, s.rt)
        return StepLosses(loss=ce, f_ce_on_unlearnable=ce)
    step_fn = joint_step if stage == "joint" else g_step
    objective, ce, l2 = step_fn(s.g, s.f, s.distortion, x, y, cfg, s.rt, s.rng)
    f_ce = ce if stage == "joint" else None  # in a G step f is frozen: its CE is G's objective, not f's training loss
    return StepLosses(loss=objective, f_ce_on_unlearnable=f_ce, g_objective=objective, g_ce=ce, delta_l2=l2)


# ------------------------------------------------------------------------------------------------------ the steps


def f_step(g: Runner, f: Runner, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, rt: Runtime) -> float:
    """Algorithm 1, lines 4-6: train f to classify the unlearnable example x + δ as ŷ, G fixed. Returns f's CE."""
    with torch.no_grad(), rt.autocast():
        delta = g.module(x, y).float()  # Clip(G(x), -ε, ε): G's output is tanh · ε
    x_ue = (x + delta).clamp_(0, 1)
    f.wrapped.train()
    with rt.autocast():
        loss = view_cross_entropy(f.wrapped(x_ue).float(), y)
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
    """Algorithm 1, lines 11-13: train G so the frozen f (eval mode) classifies T(x + δ) as ŷ with small ‖δ‖₂.

    Returns (G's objective, its CE term, E‖δ‖₂) as floats.
    """
    f.module.eval()  # frozen f: running stats stay put, and no DDP buffer sync on the unwrapped module
    g.wrapped.train()
    loss, ce, l2 = error_minimising_loss(g, f.module, f.module, distortion, x, y, cfg, rt, rng)
    g.backward_and_step(loss, cfg.optim.grad_clip)
    return loss.item(), ce.item(), l2.item()


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
    moves δ toward what a network that is still learning picks up first (measured: docs/measurements.md).
    Raises ConfigError under DeepSpeed, whose engines step one model per backward.
    """
    if rt.deepspeed:
        raise ConfigError("schedule=joint needs the DDP runner: DeepSpeed engines step one model per backward")
    f.wrapped.train()
    g.wrapped.train()
    loss, ce, l2 = error_minimising_loss(g, f.wrapped, f.module, distortion, x, y, cfg, rt, rng)
    rt.accelerator.backward(loss)
    for runner in (g, f):
        runner.step(cfg.optim.grad_clip)
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
    """(α·CE(classify(T(x + δ)), ŷ) + β·E‖δ‖₂, CE, E‖δ‖₂) with δ = G(x, ŷ) (paper, Eq. 3); scalars with gradients.

    x: (B, 3, H, W) in [0, 1]; y: (B,) int64. ``surrogate`` is what T's PGD attacks; ``classify`` is f's DDP wrapper
    when f learns from the loss (joint), the plain module when it is frozen.
    """
    with rt.autocast():
        delta = g.wrapped(x, y).float()
    x_seen = distortion((x + delta).clamp(0, 1), model=surrogate, labels=y, generator=rng)
    with rt.autocast():
        ce = view_cross_entropy(classify(x_seen).float(), y)
    l2 = delta.flatten(1).norm(dim=1).mean()
    return cfg.optim.alpha * ce + cfg.optim.beta * l2, ce, l2


# ------------------------------------------------------------------------------------------------- the schedule


def stage_of(epoch: int, f_every: int, schedule: str = "alternate") -> str:
    """Algorithm 1: epoch % 5 == 1 trains f, the others train G (epochs count from 1); every epoch is joint in joint."""
    if schedule == "joint":
        return "joint"
    return "f" if epoch % f_every == 1 else "g"


def begin_epoch(s: TrainingSetup, cfg: TrainConfig, epoch: int, stage: str, resumed_mid_epoch: bool) -> None:
    """Reset f when the schedule says so, set this epoch's learning rates and distortion (curriculum), and freeze the
    player that rests."""
    if cfg.curriculum.from_epoch:
        s.distortion = DistortionLayer(distortion_at(cfg, epoch)).to(s.rt.device)
    if not resumed_mid_epoch and resets_surrogate(epoch, cfg):  # a mid-epoch checkpoint already holds the fresh f
        reset_surrogate(s.f, cfg, s.side_info.num_classes, epoch)
    if stage != "g":
        s.f.set_lr(lr_at(epoch, cfg.optim.lr_f, cfg))
    if stage != "f":
        s.g.set_lr(lr_at(epoch, cfg.optim.lr_g, cfg))
    set_requires_grad(s.f.module, stage != "g")
    set_requires_grad(s.g.module, stage != "f")


def resets_surrogate(epoch: int, cfg: TrainConfig) -> bool:
    """Whether epoch ``epoch`` (from 1) starts with a fresh surrogate (joint schedule, ``f_reset_every``)."""
    every = cfg.f_reset_every
    return cfg.schedule == "joint" and every > 0 and epoch > 1 and (epoch - 1) % every == 0


@torch.no_grad()
def reset_surrogate(f: Runner, cfg: TrainConfig, num_classes: int, epoch: int) -> None:
    """Fresh weights for f, or for its grayscale network alone (``f_reset_part``), seeded by (seed, epoch) so every
    rank and a resumed run draw the same, and empty Adam state for the renewed parameters. The parameters are copied
    in place: DDP and the optimiser keep pointing at the same tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "f-reset", epoch))
        fresh = build_surrogate(cfg, num_classes, pretrained=False)
    prefix = "gray." if cfg.f_reset_part == "gray" else ""
    f.module.load_state_dict({k: v for k, v in fresh.state_dict().items() if k.startswith(prefix)}, strict=not prefix)
    for name, param in f.module.named_parameters():
        if name.startswith(prefix):
            f.base_optimizer.state.pop(param, None)


def lr_at(epoch: int, base: float, cfg: TrainConfig) -> float:
    """Per-epoch learning rate (epochs count from 1): ``optim.schedule`` constant, cosine, or step (÷10 per third)."""
    if cfg.optim.schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    if cfg.optim.schedule == "step":
        return base * (0.1 ** ((epoch - 1) // max(1, cfg.epochs // 3)))
    return base


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def print_banner(s: TrainingSetup, cfg: TrainConfig, run: RunState) -> None:
    """The run's one-line banner, and for a finished run whose export is missing, that it is exported now."""
    rt = s.rt
    console.print(
        f"[bold]segue train[/]: {s.num_samples} samples, K={s.side_info.num_classes} ({s.side_info.source}), "
        f"{rt.world_size} process(es) on {rt.device.type}{' with DeepSpeed' if rt.deepspeed else ''}, "
        f"{s.batches} batches of {cfg.data.batch_size} per process per epoch, "
        f"{s.workers} loader worker(s) per process{f' ({s.workers_note})' if s.workers_note else ''}"
    )
    if run.finished:
        console.print(run.export_note(cfg), soft_wrap=True, markup=False)


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


# Public names of this module before the plumbing moved to segue_dist/training/ (tests, bench/ and users import them).
__all__ = [
    "SCHEDULES", "DataConfig", "OptimConfig", "Runner", "Runtime", "SurrogateConfig", "TrainConfig", "build_models",
    "error_minimising_loss", "f_step", "g_step", "joint_step", "lr_at", "main", "make_runtime", "resolve_side_info",
    "set_requires_grad", "stage_of", "train",
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
