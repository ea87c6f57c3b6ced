"""Targeted adversarial poisoning (TAP): Fowl et al., "Adversarial Examples Make Strong Poisons", NeurIPS 2021.

A surrogate f is trained on the clean set; every image then gets a targeted L∞ PGD perturbation toward another
class, π(y) = (y + 1) mod K, i.e. δ minimising CE(f(x + δ), π(y)) with |δ| ≤ ε. A victim trained on (x + δ, y)
learns the non-robust features of π(y) as y and misreads clean faces. In the Image Shortcut Squeezing study (Liu et
al., ICML 2023) this is one of the few 8/255 poisons that keeps protecting under grayscale, because adversarial
features live mostly in luminance; ``grayscale_views`` also takes the expectation over the grayscale transform.

Differences from the paper's recipe (a pretrained CIFAR model, 250 PGD steps): the surrogate is trained here from
scratch (``train_epochs``, Adam, flip + crop), and the step count is a parameter. Library code: no I/O, no printing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segue_dist.attacks import flip_crop, grayscale
from segue_dist.ops.pgd import pgd_delta
from segue_dist.utils.seed import derive_seed

__all__ = ["TAPConfig", "generate_tap", "target_classes"]


@dataclass
class TAPConfig:
    """TAP's settings: the surrogate's training, the targeted PGD, and the grayscale expectation."""

    train_epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    pgd_steps: int = 30
    step_size: float = 0.0  # 0 = 2.5 * eps / pgd_steps (Madry et al.)
    grayscale_views: bool = True  # PGD on the mean loss of the colour and the BT.601 grayscale view

    def __post_init__(self) -> None:
        if self.train_epochs < 1 or self.pgd_steps < 1 or self.batch_size < 1:
            raise ValueError("tap: train_epochs, pgd_steps and batch_size must be >= 1")
        if self.lr <= 0 or self.step_size < 0:
            raise ValueError(f"tap: lr must be > 0 and step_size >= 0, got {self.lr}, {self.step_size}")


def target_classes(labels: Tensor, num_classes: int) -> Tensor:
    """π(y) = (y + 1) mod K: every class is pushed toward the next one (Fowl et al. 2021, class-targeted)."""
    return (labels + 1) % num_classes


class _ColourAndGrey(nn.Module):
    """f on the colour batch and on its grayscale copy, logits concatenated along the batch: (2B, K)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.cat([x, grayscale(x)]))


def train_surrogate(model: nn.Module, images: Tensor, labels: Tensor, cfg: TAPConfig, seed: int) -> nn.Module:
    """Train ``model`` on the clean (N, 3, H, W) images in [0, 1] with the victim's flip + crop; returns it in eval mode."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "tap-surrogate"))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.train_epochs):
        for idx in torch.randperm(len(images), generator=gen).split(cfg.batch_size):
            loss = F.cross_entropy(model(flip_crop(images[idx], gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def generate_tap(
    model_factory: Callable[[], nn.Module],
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    eps: float,
    seed: int,
    config: TAPConfig | None = None,
) -> Tensor:
    """TAP perturbations (N, 3, H, W) with |δ| ≤ eps for images (N, 3, H, W) in [0, 1] and labels (N,) int64.

    ``model_factory()`` gives a fresh surrogate (built under a fork of the RNG seeded from ``seed``); it is trained on
    the clean images, then every image gets ``pgd_steps`` of targeted PGD toward :func:`target_classes`.
    """
    cfg = config or TAPConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "tap-surrogate-init"))
        model = model_factory()
    model = train_surrogate(model, images, labels, cfg, seed)
    attacked: nn.Module = _ColourAndGrey(model) if cfg.grayscale_views else model
    views = 2 if cfg.grayscale_views else 1

    def toward_target(logits: Tensor, target: Tensor) -> Tensor:
        return -F.cross_entropy(logits, target.repeat(views))  # PGD ascends this: CE toward the target falls

    targets = target_classes(labels, num_classes)
    chunks = []
    for idx in torch.arange(len(images)).split(cfg.batch_size):
        chunks.append(
            pgd_delta(
                attacked,
                images[idx],
                targets[idx],
                radius=eps,
                steps=cfg.pgd_steps,
                random_start=False,
                step_size=cfg.step_size or None,
                loss_fn=toward_target,
            )  # fmt: skip
        )
    return torch.cat(chunks)
