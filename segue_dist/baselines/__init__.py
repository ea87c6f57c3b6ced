"""Baseline availability attacks the Segue paper compares against (random noise, LSP, UE) and TAP.

Uniform entry point for the evaluation harness::

    delta = make_baseline_perturbations("lsp", images, labels, num_classes=K, eps=8 / 255, seed=0)
    protected = (images + delta).clamp(0, 1)

Every baseline returns an *effective* ``delta``: ``|delta| <= eps`` and ``images + delta`` already in [0, 1] (up to
float rounding, hence the clamp above). ``BASELINES`` maps a method name to a function with the same signature as
:func:`make_baseline_perturbations` minus ``method``.

Per-method keyword options (``**kw``):

* ``"random"``: ``classwise`` (bool, default False), ``base_size`` ((h, w) | None).
* ``"lsp"``: ``samplewise`` (bool, default True = official), ``patch_grid`` ((gh, gw) | None), ``class_sep``,
  ``linf_mode`` ("clip" | "rescale").
* ``"ue"``: any :class:`UEConfig` field (``mode``, ``pgd_steps``, ``train_steps``, ``max_rounds``, ``stop_acc``,
  ``batch_size``, ``lr``, ...), plus ``device`` and ``progress_callback``. Needs ``model_factory``: a zero-argument
  callable returning a fresh surrogate ``nn.Module`` (e.g. ``lambda: build_classifier("resnet18", K)``); it is
  called under a forked RNG seeded from ``seed`` so the surrogate's initialisation is reproducible.
* ``"tap"``: any :class:`TAPConfig` field (``train_epochs``, ``pgd_steps``, ``grayscale_views``, ...). Needs
  ``model_factory`` as UE does: targeted adversarial poisoning (Fowl et al. 2021), baselines/tap.py.

``keys``: stable per-sample ids (dataset indices or shard keys) for the sample-wise random and LSP draws; default
``range(N)``. Pass the real keys when the same images must get the same noise across differently ordered runs.

Library package: no I/O, no printing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segue_dist.baselines.lsp import LSP, default_patch_grid
from segue_dist.baselines.random_noise import RandomNoise
from segue_dist.baselines.tap import TAPConfig, generate_tap
from segue_dist.baselines.ue import UEConfig, UEResult, generate_ue, run_ue
from segue_dist.utils.seed import derive_seed

__all__ = [
    "BASELINES",
    "LSP",
    "BaselineFn",
    "RandomNoise",
    "TAPConfig",
    "UEConfig",
    "UEResult",
    "default_patch_grid",
    "generate_tap",
    "generate_ue",
    "make_baseline_perturbations",
    "run_ue",
]

Key = int | str


def _check(images: Tensor, labels: Tensor, num_classes: int) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"baseline: images must be (N, 3, H, W), got {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"baseline: labels must be (N,) with N = {images.shape[0]}, got {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"baseline: num_classes must be >= 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"baseline: labels must be in [0, {num_classes})")


def _effective(images: Tensor, delta: Tensor) -> Tensor:
    return (images + delta.to(images.device, images.dtype)).clamp(0.0, 1.0) - images


def _keys(keys: Sequence[Key] | None, n: int) -> list[Key]:
    if keys is None:
        return list(range(n))
    ks = list(keys)
    if len(ks) != n:
        raise ValueError(f"baseline: got {len(ks)} keys for {n} images")
    return ks


# A method's perturbation, given checked inputs and one stable key per image.
PerturbFn = Callable[..., Tensor]


def _random(images: Tensor, labels: Tensor, keys: list[Key], *, eps: float, seed: int, **kw: Any) -> Tensor:
    gen = RandomNoise(eps=eps, seed=seed, **kw)
    return gen.perturbation(labels, keys, size=(images.shape[-2], images.shape[-1]))


def _lsp(
    images: Tensor, labels: Tensor, keys: list[Key], *, num_classes: int, eps: float, seed: int, **kw: Any
) -> Tensor:
    gen = LSP(num_classes=num_classes, image_size=(images.shape[-2], images.shape[-1]), eps=eps, seed=seed, **kw)
    return gen.perturbation(labels, keys)


Factory = Callable[[], nn.Module]


def _ue(images: Tensor, labels: Tensor, keys: list[Key], *, model_factory: Factory, seed: int, **kw: Any) -> Tensor:
    # Reproducible surrogate init without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "ue-surrogate-init"))
        model = model_factory()
    return generate_ue(model, images, labels, seed=seed, **kw)


def _tap(images: Tensor, labels: Tensor, keys: list[Key], *, model_factory: Factory, **kw: Any) -> Tensor:
    given = {name: kw.pop(name) for name in ("num_classes", "eps", "seed")}
    return generate_tap(model_factory, images, labels, **given, config=TAPConfig(**kw))


class BaselineFn:
    """One method behind the common signature: inputs checked, keys resolved, ``delta`` made effective."""

    def __init__(self, perturb: PerturbFn, uses: tuple[str, ...] = ()) -> None:
        self.perturb = perturb
        self.uses = uses  # which of num_classes / model_factory the method takes

    def __call__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        num_classes: int,
        eps: float,
        seed: int,
        model_factory: Callable[[], nn.Module] | None = None,
        keys: Sequence[Key] | None = None,
        **kw: Any,
    ) -> Tensor:
        _check(images, labels, num_classes)
        if "model_factory" in self.uses and model_factory is None:
            raise ValueError("this baseline needs model_factory: a callable returning a fresh surrogate nn.Module")
        given = {"num_classes": num_classes, "model_factory": model_factory}
        extra = {name: given[name] for name in self.uses}
        delta = self.perturb(images, labels, _keys(keys, images.shape[0]), eps=eps, seed=seed, **extra, **kw)
        return _effective(images, delta)


BASELINES: dict[str, BaselineFn] = {
    "random": BaselineFn(_random),
    "lsp": BaselineFn(_lsp, ("num_classes",)),
    "ue": BaselineFn(_ue, ("num_classes", "model_factory")),
    "tap": BaselineFn(_tap, ("num_classes", "model_factory")),
}


def make_baseline_perturbations(
    method: str,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    eps: float = 8 / 255,
    seed: int = 0,
    model_factory: Callable[[], nn.Module] | None = None,
    keys: Sequence[Key] | None = None,
    **kw: Any,
) -> Tensor:
    """Perturbations ``(N, 3, H, W)`` of one baseline for a labelled image set; see the module docstring."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {sorted(BASELINES)}")
    return BASELINES[method](
        images, labels, num_classes=num_classes, eps=eps, seed=seed, model_factory=model_factory, keys=keys, **kw
    )
