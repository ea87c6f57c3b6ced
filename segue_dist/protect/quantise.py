"""ε in uint8 levels and the quantisation of protected images: the one place either is computed.

Used by `segue protect` in both modes (shards: G's δ at the image size; folders: G's δ at the face scale, up-sampled
first) and by `segue evaluate baseline` (UE / LSP / random noise), so that every protected set, whatever made it,
meets the same check: ``|written - original| <= eps_levels(eps)`` on the uint8 pixels, with the same bytes for the
same δ.

The rule: δ is rounded to whole levels on its own (``torch.round``: half to even), clamped to ``±eps_levels``, added to
the integer original and clipped to [0, 255]. Rounding δ rather than ``original + 255·δ`` makes a pixel's step
independent of the original's parity at exact .5 ties, and lets folder mode round δ once before adding it to
photos of any mode (8-bit, gray, 16-bit).
"""

from __future__ import annotations

import math

import torch


def eps_levels(eps: float) -> int:
    """ε in uint8 levels: floor(255·ε), never above ε (equals round(255·ε) for the usual ε = k/255)."""
    return int(math.floor(255.0 * eps + 1e-6))


def delta_levels(delta: torch.Tensor, eps_levels: int) -> torch.Tensor:
    """Float δ in [0, 1] units (any shape) -> whole uint8 levels as int16, rounded (half to even) and clamped to
    ``[-eps_levels, eps_levels]``; adding them to an integer image and clipping to [0, 255] keeps
    ``|protected - original| <= eps_levels`` exactly, whatever G or rounding did."""
    return delta.to(torch.float32).mul(255.0).round_().clamp_(-eps_levels, eps_levels).to(torch.int16)


def quantise_protected(original: torch.Tensor, delta: torch.Tensor, eps_levels: int) -> torch.Tensor:
    """uint8 protected images from uint8 originals and float δ (in [0, 1] units) of the same shape, any shape.

    Vectorised over the whole batch: ``clip(original + delta_levels(δ), 0, 255)``.
    """
    delta_int = delta_levels(delta, eps_levels).to(original.device)
    return original.to(torch.int16).add_(delta_int).clamp_(0, 255).to(torch.uint8)
