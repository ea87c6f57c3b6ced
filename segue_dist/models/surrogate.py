"""Surrogates with more than one view of the image: a colour network and a twin that sees only its luminance.

The min-min of unlearnable examples (Huang et al. 2021; Segue, section III-D) gives G one surrogate f to please, and
G pleases it with whatever f learns first: on faces, a coarse colour pattern, which a grayscale attacker removes
(docs/protection_research.md). Putting grayscale views into the one f (``distortion.grayscale_p``) lets f satisfy
both with luminance and the colour pattern weakens. `GrayscaleTwin` keeps the two apart: the colour network
learns from ``x`` and its twin from BT.601 ``gray(x)``, each with its own weights, and the loss is the mean of
their cross-entropies, so G must keep a pattern the colour network learns *and* put one in luminance that the
grayscale network learns.
"""

from __future__ import annotations

import torch
from torch import nn

from segue_dist.distortion import to_grayscale
from segue_dist.ops.losses import view_cross_entropy

__all__ = ["GrayscaleTwin", "view_cross_entropy"]


class GrayscaleTwin(nn.Module):
    """Two classifiers over one batch: ``colour(x)`` and ``gray(to_grayscale(x))``.

    forward: ``x`` (B, 3, H, W) in [0, 1] -> logits (B, K, 2), the last axis the views (colour, grayscale); score it
    with `view_cross_entropy`. Weights live under ``colour.`` and ``gray.``.
    """

    def __init__(self, colour: nn.Module, gray: nn.Module) -> None:
        super().__init__()
        self.colour = colour
        self.gray = gray

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.colour(x), self.gray(to_grayscale(x))], dim=-1)
