"""Training a victim from scratch on a (protected) training feed and measuring its clean-test accuracy: the paper's
metric (Section IV-A), with chance and the ratio to chance beside it."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segue_dist.attacks import AttackerConfig, pgd_linf, train_batch_transform
from segue_dist.evaluate.config import VictimConfig
from segue_dist.evaluate.data import PreparedData, TestFeed, prepare_data
from segue_dist.supervised import supervised_epoch
from segue_dist.utils.progress import make_progress
from segue_dist.utils.seed import derive_seed, seed_everything


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
    """One epoch (from 0) on the attacker's training batches; raises RuntimeError when the loss is not finite."""
    model.train()
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", epoch))

    def logits_of(x: Tensor, _targets: Tensor) -> Tensor:
        with _autocast(device):
            return model(x)

    stats = supervised_epoch(_attacker_batches(model, data, attack, device, gen, epoch), logits_of, opt, sched)
    if not np.isfinite(stats.loss_sum):
        raise RuntimeError(f"victim training diverged at epoch {epoch + 1} (loss is not finite); lower train.lr")
    return {
        "epoch": epoch + 1,
        "train_loss": stats.mean_loss,
        "train_acc": 100.0 * stats.correct / max(1, stats.seen),
        "lr": sched.get_last_lr()[0],
    }


def _attacker_batches(
    model: nn.Module,
    data: PreparedData,
    attack: AttackerConfig,
    device: torch.device,
    gen: torch.Generator,
    epoch: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, soft targets) of one epoch after the attacker's transforms and, with ``adv_rho`` > 0, PGD against the model
    as it is at that batch (lazily: the loop steps the model between batches)."""
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
        yield x, targets


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
