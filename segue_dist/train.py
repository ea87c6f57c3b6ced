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
line and writes nothing (`finished`); more `epochs`, or a `stop_loss` below the loss it stopped at, continue it.

This module is the algorithm; the plumbing lives in segue_dist/training/: config, runtime (DDP / DeepSpeed `Runner`),
build, resume (exact-resume checkpoints), history (records, metrics.jsonl), summary (export, table).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segue_dist.config import ConfigError, load_config, save_resolved
from segue_dist.data.loader import train_loader
from segue_dist.distortion import DistortionLayer
from segue_dist.ops.losses import view_cross_entropy
from segue_dist.training.build import TrainingSetup, build_models, build_surrogate, resolve_labels, setup_training
from segue_dist.training.config import (
    SCHEDULES,
    DataConfig,
    OptimConfig,
    SurrogateConfig,
    TrainConfig,
    distortion_at,
)
from segue_dist.training.history import EpochMeter, Logger, StepLosses
from segue_dist.training.resume import load_checkpoint, save_checkpoint, saved_position
from segue_dist.training.runtime import Runner, Runtime, average_buffers, make_runtime, to_float_images
from segue_dist.training.summary import PAUSED, finish
from segue_dist.utils.dist import is_main
from segue_dist.utils.io import read_json
from segue_dist.utils.progress import console, make_progress
from segue_dist.utils.seed import derive_seed


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run Algorithm 1 (resuming from the last checkpoint when ``cfg.resume``); returns the summary: epochs run,
    per-epoch history (segue_dist/training/history.py), stop reason, where the generator was exported.

    A run whose last checkpoint is finished (`finished`) is left as it is: one line says so and the summary it wrote
    is returned, no file is written. If its export is missing (killed after the last checkpoint), G is exported from
    that checkpoint without training.
    """
    done = finished(cfg) if cfg.resume else None
    if done is not None and done.exported:
        if is_main():
            console.print(done.message, soft_wrap=True, highlight=False, markup=False)
        return read_json(Path(cfg.out) / "train_summary.json")
    s = setup_training(cfg)
    if s.rt.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, cfg.out)
    position = load_checkpoint(s.g, s.f, s.rng, cfg, s.rt) if cfg.resume else None
    start_epoch, skip, step = (position["epoch"], position["batch"], position["step"]) if position else (1, 0, 0)
    last_epoch = start_epoch - 1 if done else cfg.epochs  # finished but not exported: export only
    logger, history = Logger(cfg, s.rt), []
    if s.rt.is_main:
        console.print(describe(s, cfg))
        if done:
            note = f"{cfg.out}: {done.state}, but its generator is not exported: exporting it"
            console.print(note, soft_wrap=True, markup=False)
    stop_reason = done.stop_reason if done else "epochs"
    epochs_this_run = 0
    with make_progress(disable=not s.rt.is_main or last_epoch < start_epoch) as progress:
        task = progress.add_task("train", total=(last_epoch - start_epoch + 1) * s.batches, completed=skip)
        for epoch in range(start_epoch, last_epoch + 1):  # Algorithm 1, line 1
            stage = stage_of(epoch, cfg.f_every, cfg.schedule)
            begin_epoch(s, cfg, epoch, stage, resumed_mid_epoch=skip > 0)
            record, step = run_epoch(
                s, cfg, epoch, stage, skip, step, logger, lambda info: progress.update(task, advance=1, info=info)
            )
            history.append(record)
            logger.log_epoch(step, record)
            skip = 0
            epochs_this_run += 1
            reason = reason_to_stop(record, cfg, epoch, epochs_this_run)
            end = end_of_run(record, cfg, epoch, reason)
            save_checkpoint(s.g, s.f, {"epoch": epoch + 1, "batch": 0, "step": step, **end}, s.rng, cfg, s.rt)
            if reason:
                stop_reason = reason
                break
    logger.close()
    summary = finish(s.g, cfg, s.rt, history, stop_reason, start_epoch - 1 + epochs_this_run, step, s.labels)
    if s.rt.world_size > 1:
        dist.barrier()
    return summary


def run_epoch(
    s: TrainingSetup,
    cfg: TrainConfig,
    epoch: int,
    stage: str,
    skip: int,
    step: int,
    logger: Logger,
    advance: Callable[[str], None],
) -> tuple[dict[str, Any], int]:
    """One epoch of ``stage`` from batch ``skip`` (a resumed run fast-forwards); returns (history record, steps so
    far). Checkpoints every ``checkpoint_every`` steps inside the epoch; the epoch-end checkpoint is the caller's."""
    meter = EpochMeter(stage)
    s.stream.set_epoch(epoch, skip_batches=skip)
    t0 = time.perf_counter()
    for batch_index, (images, labels, skipped) in enumerate(train_loader(s.stream, s.workers), start=skip):
        x, y = to_float_images(images, s.rt), labels.to(s.rt.device, non_blocking=True)  # Algorithm 1, lines 3/10
        losses = take_step(stage, s, x, y, cfg)
        step += 1
        meter.add(losses, skipped)
        advance(f"epoch {epoch} {stage}-stage loss {losses.loss:.4f}")
        if step % cfg.log_every == 0:
            logger.log(step, {**losses.logged(stage), "epoch": epoch})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batch_index + 1 < s.batches:
            save_checkpoint(s.g, s.f, {"epoch": epoch, "batch": batch_index + 1, "step": step}, s.rng, cfg, s.rt)
    if stage != "g":
        average_buffers(s.f.module, s.rt)  # f must be one function on every rank before G trains against it
    return meter.record(epoch, s.rt, cfg.data.batch_size, time.perf_counter() - t0), step


def take_step(stage: str, s: TrainingSetup, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> StepLosses:
    """The step of ``stage`` on one batch, its losses named as in the history record."""
    if stage == "f":
        ce = f_step(s.g, s.f, x, y, cfg, s.rt)
        return StepLosses(loss=ce, f_ce_on_unlearnable=ce)
    step_fn = joint_step if stage == "joint" else g_step
    objective, ce, l2 = step_fn(s.g, s.f, s.distortion, x, y, cfg, s.rt, s.rng)
    f_ce = ce if stage == "joint" else None  # in a G step f is frozen: its CE is G's objective, not f's training loss
    return StepLosses(loss=objective, f_ce_on_unlearnable=f_ce, g_objective=objective, g_ce=ce, delta_l2=l2)


def reason_to_stop(record: dict[str, Any], cfg: TrainConfig, epoch: int, epochs_this_run: int) -> str | None:
    """Why training ends after this epoch, or None. The loss test is the paper's (section III-D): f's loss on the
    unlearnable examples, so only an epoch in which f trained can meet it."""
    f_loss = record["f_ce_on_unlearnable"]
    if f_loss is not None and f_loss < cfg.stop_loss:
        return loss_stop_reason(f_loss, cfg.stop_loss)
    if cfg.max_epochs_this_run and epochs_this_run >= cfg.max_epochs_this_run and epoch < cfg.epochs:
        return PAUSED
    return None


def loss_stop_reason(f_loss: float, stop_loss: float) -> str:
    return f"f's loss on unlearnable examples {f_loss:.2e} < {stop_loss:g}"


def end_of_run(record: dict[str, Any], cfg: TrainConfig, epoch: int, reason: str | None) -> dict[str, Any]:
    """What the checkpoint after ``epoch`` adds to its position when the run ends there for good (the loss test's
    ``reason``, or the last epoch): ``{"stop": ...}``, which `finished` reads when the run is started again; else {}."""
    if reason == PAUSED or (reason is None and epoch < cfg.epochs):
        return {}
    if reason is None:
        return {"stop": {"reason": "epochs", "epochs": cfg.epochs}}
    f_loss = record["f_ce_on_unlearnable"]
    return {"stop": {"reason": "stop_loss", "epochs": cfg.epochs, "f_loss": f_loss, "stop_loss": cfg.stop_loss}}


@dataclass
class Finished:
    """A finished run found under ``out`` (see `finished`)."""

    state: str  # "finished (12/12 epochs, stopped: epochs)"
    stop_reason: str  # as train_summary.json words it
    message: str  # the one line a rerun prints
    exported: bool  # its generator and train_summary.json are written


def finished(cfg: TrainConfig) -> Finished | None:
    """Whether ``cfg.out``'s last checkpoint ends the run that ``cfg`` asks for, or None when there is more to train.

    It does when it is at an epoch end and either all of ``cfg.epochs`` have run or the run stopped on the loss test
    at a loss still below ``cfg.stop_loss`` (so a lower stop_loss, e.g. 0, which never stops early, continues it).
    Reads JSON only: no model is built and no process group joined. A checkpoint written before runs recorded their
    stop knows only its epochs: such a run stopped on stop_loss continues.
    """
    position = saved_position(cfg)
    if position is None or position["batch"]:
        return None
    done = position["epoch"] - 1
    stop = position.get("stop") or {"reason": "epochs", "epochs": done}
    hints = []
    if done >= cfg.epochs:
        hints.append(f"raise epochs=N (N > {done})")
    if stop["reason"] == "stop_loss" and stop["f_loss"] < cfg.stop_loss:
        hints.append(f"lower stop_loss below {stop['f_loss']:.2e} (stop_loss=0 never stops early)")
    if not hints:
        return None
    reason = "epochs" if stop["reason"] == "epochs" else loss_stop_reason(stop["f_loss"], stop["stop_loss"])
    state = f"finished ({done}/{stop['epochs']} epochs, stopped: {reason})"
    message = f"{cfg.out} is {state}; nothing to do — {' and '.join(hints)} to train further, or choose a new out="
    return Finished(state, reason, message, exported=was_exported(cfg, done))


def was_exported(cfg: TrainConfig, epochs_run: int) -> bool:
    """Whether the run under ``cfg.out`` wrote its generator and, last, a summary of its end after ``epochs_run``."""
    summary_path = Path(cfg.out) / "train_summary.json"
    if not summary_path.is_file() or not (Path(cfg.out) / "generator.json").is_file():
        return False
    summary = read_json(summary_path)
    return summary.get("last_epoch") == epochs_run and summary.get("stop_reason") != PAUSED


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
        reset_surrogate(s.f, cfg, s.labels.num_classes, epoch)
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
    """Fresh weights for f (seeded by (seed, epoch), so every rank and a resumed run draw the same) and empty Adam
    state. The parameters are copied in place: DDP and the optimiser keep pointing at the same tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "f-reset", epoch))
        fresh = build_surrogate(cfg, num_classes, pretrained=False)
    f.module.load_state_dict(fresh.state_dict())
    f.base_optimizer.state.clear()


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


def describe(s: TrainingSetup, cfg: TrainConfig) -> str:
    """The run's one-line banner."""
    rt = s.rt
    return (
        f"[bold]segue train[/]: {s.num_samples} samples, K={s.labels.num_classes} ({s.labels.source}), "
        f"{rt.world_size} process(es) on {rt.device.type}{' with DeepSpeed' if rt.deepspeed else ''}, "
        f"{s.batches} batches of {cfg.data.batch_size} per process per epoch, "
        f"{s.workers} loader worker(s) per process{f' ({s.workers_note})' if s.workers_note else ''}"
    )


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
    "error_minimising_loss", "f_step", "g_step", "joint_step", "lr_at", "main", "make_runtime", "resolve_labels",
    "set_requires_grad", "stage_of", "train",
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
