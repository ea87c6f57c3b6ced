"""UE: error-minimising noise, Unlearnable Examples (Huang et al., ICLR 2021).

Bi-level min-min problem ``min_theta min_delta CE(f_theta(x + delta), y)`` with ``||delta||_inf <= eps``, solved by
alternating, as the official ``perturbation.py`` does:

(a) train the surrogate ``f`` for ``train_steps`` mini-batches on ``clamp(x + delta, 0, 1)`` (SGD, momentum 0.9,
    weight decay 5e-4, grad-norm clip 5, the official CIFAR config);
(b) update ``delta`` by ``pgd_steps`` of sign-gradient *descent* on the CE loss (step ``eps / 10``), projecting onto
    the eps-ball and onto valid images after every step, with the surrogate frozen in eval mode;
(c) measure the surrogate's accuracy on ``clamp(x + delta, 0, 1)`` (eval mode) and stop once it reaches ``stop_acc``
    (official: 0.99 sample-wise) or after ``max_rounds``.

Modes:

* ``samplewise``: one delta per image, every image visited once per round in a fixed order (official).
* ``classwise``: one delta per class. Each PGD step moves the class pattern along the sign of the loss gradient with
  respect to the *shared* pattern, i.e. of the gradient averaged over the batch's images of that class. (The official
  code instead runs PGD per image and sets the class noise to the mean of the per-image results; taking the sign of the
  mean gradient is the same min-min objective without the dilution, and what "universal" noise means.) Batches are
  shuffled each round. Official class-wise runs use 1 PGD step per batch and stop at accuracy 0.9; pass
  ``pgd_steps=1, stop_acc=0.9`` to mimic them.

Initial delta is zero as in the official default (``random_start=True`` draws ``U(-eps, eps)`` instead).

Scale: the whole image set lives in memory (``images`` is one ``(N, 3, H, W)`` tensor) and every round runs PGD over
all of it, so UE costs O(rounds x N x pgd_steps) forward/backward passes of the surrogate, and the noise is tied to the
exact images and classes it was optimised on. That is fine for the evaluation harness (hundreds to a few thousand
images) but impractical at corpus scale, which is precisely the Segue paper's argument for a once-trained generator
(Table VII: ~1000x slower than one generator forward pass).

Determinism: batch order and ``random_start`` use a ``torch.Generator`` seeded from ``seed``; anything inside the
surrogate that draws from the global RNG (dropout, stochastic depth) runs under ``torch.random.fork_rng`` seeded from
``seed``, so the caller's RNG state is untouched and a CPU run is bit-reproducible. The surrogate is trained *in
place* (its final state is the min-min surrogate; pass a fresh model).

Library module: no I/O, no printing; progress is reported through ``progress_callback(round, acc)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segue_dist.utils.seed import derive_seed

__all__ = ["UEConfig", "UEResult", "generate_ue", "run_ue"]

ProgressCallback = Callable[[int, float], None]


@dataclass
class UEConfig:
    """Hyper-parameters of the UE min-min search (defaults: the paper's CIFAR sample-wise recipe, fewer PGD steps)."""

    mode: Literal["samplewise", "classwise"] = "samplewise"
    eps: float = 8 / 255
    step_size: float | None = None  # None -> eps / 10 (0.8/255 at eps 8/255, official)
    pgd_steps: int = 10  # paper: 20 sample-wise, 1 per batch class-wise
    train_steps: int = 10  # surrogate mini-batches per round (official)
    max_rounds: int = 30
    stop_acc: float = 0.99  # official sample-wise stop: train error <= 0.01
    batch_size: int = 128  # official 512 on CIFAR-10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float | None = 5.0
    random_start: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("samplewise", "classwise"):
            raise ValueError(f"UEConfig.mode must be 'samplewise' or 'classwise', got {self.mode!r}")
        if not (0.0 < float(self.eps) <= 1.0):
            raise ValueError(f"UEConfig.eps must be in (0, 1], got {self.eps}")
        if self.step_size is None:
            self.step_size = self.eps / 10.0
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"UEConfig.step_size must be a finite positive number, got {self.step_size}")
        for name in ("pgd_steps", "max_rounds", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UEConfig.{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise ValueError(f"UEConfig.train_steps must be an int >= 0, got {self.train_steps!r}")
        if not (0.0 < self.stop_acc <= 1.0):
            raise ValueError(f"UEConfig.stop_acc must be in (0, 1], got {self.stop_acc}")
        if not (self.lr > 0):
            raise ValueError(f"UEConfig.lr must be > 0, got {self.lr}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"UEConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"UEConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise ValueError(f"UEConfig.grad_clip must be > 0 or None, got {self.grad_clip}")


@dataclass
class UEResult:
    """Outcome of :func:`run_ue` (tensors on the device of the input ``images``)."""

    delta: Tensor  # (N, 3, H, W), effective: clamp(x + delta, 0, 1) - x, so |delta| <= eps and x + delta in [0, 1]
    class_noise: Tensor | None  # (K, 3, H, W) raw class patterns (class-wise mode), else None
    rounds: int
    train_acc: float  # surrogate accuracy on clamp(x + delta, 0, 1) after the last round
    converged: bool  # train_acc reached stop_acc before max_rounds ran out
    history: list[tuple[int, float]] = field(default_factory=list)  # (round, acc) per round


def _check_inputs(images: Tensor, labels: Tensor, num_classes: int | None) -> int:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"UE: images must be (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"UE: images must be float in [0, 1], got {images.dtype}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"UE: labels must be (N,) with N = {images.shape[0]}, got {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("UE: empty image set")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"UE: labels must be integer, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    k = hi + 1 if num_classes is None else int(num_classes)
    if lo < 0 or hi >= k:
        raise ValueError(f"UE: labels must be in [0, {k}), got range [{lo}, {hi}]")
    return k


def _batches(order: Tensor, batch_size: int) -> list[Tensor]:
    return list(order.split(batch_size))


class _Cycler:
    """Endless shuffled mini-batches that persist across rounds (official: one data iterator for all rounds)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator) -> None:
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.queue: list[Tensor] = []

    def next(self) -> Tensor:
        if not self.queue:
            self.queue = _batches(torch.randperm(self.n, generator=self.gen), self.batch_size)
            # drop_last, as the official loader: a trailing batch of 1 would crash BatchNorm in train mode, and the
            # reshuffle every epoch still visits every image.
            if len(self.queue) > 1 and self.queue[-1].numel() < self.batch_size:
                self.queue.pop()
        return self.queue.pop(0)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, delta_of: Callable[[Tensor], Tensor], batch_size: int) -> float:
    model.eval()
    correct = 0
    for idx in _batches(torch.arange(x.shape[0], device=x.device), batch_size):
        pred = model((x[idx] + delta_of(idx)).clamp(0.0, 1.0)).argmax(dim=1)
        correct += int((pred == y[idx]).sum())
    return correct / x.shape[0]


def run_ue(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: UEConfig | None = None,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress_callback: ProgressCallback | None = None,
) -> UEResult:
    """Run the UE min-min search and return the noise plus diagnostics (see the module docstring)."""
    cfg = config if config is not None else UEConfig()
    k = _check_inputs(images, labels, num_classes)
    out_device = images.device
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    x = images.to(dev, torch.float32)
    y = labels.to(dev, torch.int64)
    n = x.shape[0]
    eps, alpha = float(cfg.eps), float(cfg.step_size)  # type: ignore[arg-type]
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "ue-batches"))
    was_training = model.training

    def init(shape: tuple[int, ...]) -> Tensor:
        if cfg.random_start:
            return ((torch.rand(shape, generator=gen) * 2.0 - 1.0) * eps).to(dev)
        return torch.zeros(shape, device=dev)

    classwise = cfg.mode == "classwise"
    # Sample-wise: (N, 3, H, W), kept as an effective delta (x + delta already in [0, 1]).
    # Class-wise: (K, 3, H, W) raw patterns; a sample's delta is pattern[label], clamped to the image when applied.
    noise = init((k, *x.shape[1:])) if classwise else init(tuple(x.shape))
    if not classwise:
        noise = (x + noise).clamp(0.0, 1.0) - x

    def delta_of(idx: Tensor) -> Tensor:
        return noise[y[idx]] if classwise else noise[idx]

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cycler = _Cycler(n, cfg.batch_size, gen)
    history: list[tuple[int, float]] = []
    acc = 0.0
    rounds = 0
    cuda_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(derive_seed(seed, "ue-global-rng"))
        for rounds in range(1, cfg.max_rounds + 1):
            # (a) surrogate steps on the current unlearnable examples
            model.train()
            for _ in range(cfg.train_steps):
                idx = cycler.next().to(dev)
                xb = (x[idx] + delta_of(idx)).clamp(0.0, 1.0)
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()

            # (b) error-minimising PGD on the noise, surrogate frozen (eval: BN running stats, no dropout)
            model.eval()
            if classwise:
                order = torch.randperm(n, generator=gen).to(dev)
                for idx in _batches(order, cfg.batch_size):
                    xb, yb = x[idx], y[idx]
                    pattern = noise.clone()
                    for _ in range(cfg.pgd_steps):
                        pattern.requires_grad_(True)
                        loss = F.cross_entropy(model((xb + pattern[yb]).clamp(0.0, 1.0)), yb)
                        # grad w.r.t. the shared pattern = batch-mean of the per-image gradients of that class
                        (grad,) = torch.autograd.grad(loss, pattern)
                        pattern = (pattern.detach() - alpha * grad.sign()).clamp(-eps, eps)
                    noise = pattern.detach()
            else:
                for idx in _batches(torch.arange(n, device=dev), cfg.batch_size):
                    xb, yb = x[idx], y[idx]
                    d = noise[idx]
                    for _ in range(cfg.pgd_steps):
                        d.requires_grad_(True)
                        loss = F.cross_entropy(model((xb + d).clamp(0.0, 1.0)), yb)
                        (grad,) = torch.autograd.grad(loss, d)
                        d = (d.detach() - alpha * grad.sign()).clamp(-eps, eps)
                        d = (xb + d).clamp(0.0, 1.0) - xb  # project onto valid images too
                    noise[idx] = d.detach()

            # (c) stopping rule: the surrogate has (nearly) fit the unlearnable set
            acc = _accuracy(model, x, y, delta_of, cfg.batch_size)
            history.append((rounds, acc))
            if progress_callback is not None:
                progress_callback(rounds, acc)
            if acc >= cfg.stop_acc:
                break
    model.train(was_training)

    with torch.no_grad():
        per_sample = noise[y] if classwise else noise
        delta = ((x + per_sample).clamp(0.0, 1.0) - x).to(out_device)
    return UEResult(
        delta=delta,
        class_noise=noise.detach().to(out_device) if classwise else None,
        rounds=rounds,
        train_acc=acc,
        converged=acc >= cfg.stop_acc,
        history=history,
    )


def generate_ue(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float = 8 / 255,
    num_classes: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress_callback: ProgressCallback | None = None,
    **config: Any,
) -> Tensor:
    """UE noise ``(N, 3, H, W)`` for a labelled image set (``|delta| <= eps``, ``x + delta`` in [0, 1]).

    ``config``: any other :class:`UEConfig` field (``mode``, ``pgd_steps``, ``train_steps``, ``max_rounds``, ...).
    Class-wise mode returns each sample's class pattern clamped to its image; call :func:`run_ue` to also get the raw
    ``(K, 3, H, W)`` class noise, the number of rounds and whether the stopping accuracy was reached.
    """
    cfg = UEConfig(eps=eps, **config)
    return run_ue(
        model,
        images,
        labels,
        cfg,
        num_classes=num_classes,
        seed=seed,
        device=device,
        progress_callback=progress_callback,
    ).delta
