"""ε in uint8 levels and the quantisation of protected images: the one place either is computed.

Used by `segue protect` (G's output) and by `segue evaluate baseline` (UE / LSP / random noise), so that every
protected shard set, whatever made it, meets the same check: ``|written - original| <= eps_levels(eps)`` on the
uint8 pixels.
"""

from __future__ import annotations

import math

import torch


def eps_levels(eps: float) -> int:
    """ε in uint8 levels: floor(255·ε), never above ε (equals round(255·ε) for the usual ε = k/255)."""
    return int(math.floor(255.0 * eps + 1e-6))


def quantise_protected(original: torch.Tensor, delta: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 protected images from uint8 originals and G's float delta (in [0, 1] units), any shape.

    Rounding ``original + 255·delta`` alone could land half a level past ε; the clamp on integer values to
    ``original ± levels`` makes ``|protected - original| <= levels`` exact, whatever G or rounding did.
    """
    base = original.to(torch.float32)
    rounded = torch.round(base + delta.to(torch.float32) * 255.0)
    clamped = torch.minimum(torch.maximum(rounded, base - levels), base + levels)
    return clamped.clamp_(0.0, 255.0).to(torch.uint8)
