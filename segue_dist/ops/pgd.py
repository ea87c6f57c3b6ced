"""L∞ projected gradient ascent (PGD, Madry et al. 2018): the one implementation behind the distortion layer's
adversarial step (`distortion.pgd_perturbation`) and the attacker's adversarial training (`attacks.pgd_linf`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def uniform(shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) on the generator's device (default CPU generator when None), returned on the CPU."""
    if generator is None:
        return torch.rand(*shape)
    return torch.rand(*shape, generator=generator, device=generator.device).cpu()


def float32_at_most(value: float) -> float:
    """Largest float32 <= ``value``: a bound that holds both in float32 and compared as a Python double."""
    bound = torch.tensor(value, dtype=torch.float32)
    if float(bound) > value:
        bound = torch.nextafter(bound, torch.tensor(-math.inf))
    return float(bound)


def pgd_delta(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    radius: float,
    steps: int,
    random_start: bool,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """The perturbation ``adv`` (detached, shape of ``x``) that *increases* ``loss_fn(model(x + adv), target)``.

    ``x``: ``(B, C, H, W)`` images in [0, 1]; ``target``: integer labels ``(B,)`` or soft targets ``(B, K)``.
    Guarantees ``|adv| <= radius`` (the largest float32 at most ``radius``, so the bound holds in float32 too) and
    ``x + adv`` in [0, 1]. ``random_start``: start at a uniform point of the ball (Madry et al.), else at 0 (one
    step from 0 is FGSM). Step size ``2.5 * radius / steps`` unless given. The model runs in eval mode (BatchNorm
    statistics are not moved by adversarial inputs, dropout is off) and every submodule's own training flag is
    restored; gradients are taken w.r.t. the input only (parameters' ``.grad`` untouched). Pass the plain module,
    not a DistributedDataParallel wrapper. ``radius <= 0`` or ``steps < 1`` give zeros.
    """
    if radius <= 0 or steps < 1:
        return torch.zeros_like(x)
    radius = float32_at_most(radius)
    step = step_size if step_size is not None else 2.5 * radius / steps
    x0 = x.detach()
    target = target.to(x.device)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if random_start:
            noise = uniform(x0.shape, generator).to(device=x0.device, dtype=x0.dtype)
            adv = ((x0 + (2.0 * noise - 1.0) * radius).clamp(0.0, 1.0) - x0).clamp(-radius, radius)
        else:
            adv = torch.zeros_like(x0)
        for _ in range(steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(model(x0 + adv).float(), target)
                (grad,) = torch.autograd.grad(loss, adv)
            adv = (adv.detach() + step * grad.sign()).clamp(-radius, radius)
            # Keep x + adv a valid image; the second clamp keeps |adv| <= radius despite float rounding.
            adv = ((x0 + adv).clamp(0.0, 1.0) - x0).clamp(-radius, radius)
    finally:
        for module, training in flags:
            module.training = training
    return adv.detach()
