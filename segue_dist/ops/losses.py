"""Classification losses shared by training and the distortion layer's PGD."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def view_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one classifier's logits (B, K), or the mean over the views of (B, K, V) logits (one
    classifier per view, as `segue_dist.models.surrogate.GrayscaleTwin` gives), against integer labels (B,).

    Raises what ``F.cross_entropy`` raises for other shapes.
    """
    if logits.dim() == 3:
        target = target.unsqueeze(-1).expand(-1, logits.shape[-1])
    return F.cross_entropy(logits, target)
