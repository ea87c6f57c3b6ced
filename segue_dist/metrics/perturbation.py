"""What a perturbation is made of: how much of it grayscale keeps, and how much of it is one pattern per class.

Library code (tensors in, floats out, no I/O). Two statistics that predict which attackers remove a perturbation:

* **grey share of energy**: ‖grey(δ)‖² / ‖δ‖², where grey(δ) puts the mean of R, G and B on all three channels.
  A δ made only of colour differences has share 0 and is removed by a grayscale attacker (Liu et al., "Image
  Shortcut Squeezing", ICML 2023); a δ with equal R, G, B planes has share 1.
* **cosine with the class mean**: the mean over images of cos(δ_i, mean of δ over the images of i's class). Near 1,
  the perturbation is a fixed pattern per class, which Orthogonal Projection (Sandoval-Segura et al., "What Can We
  Learn from Unlearnable Datasets?", NeurIPS 2023) and an attacker who averages residuals are built to remove.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["class_mean_cosine", "delta_statistics", "grey_energy_share"]


def _check_delta(delta: Tensor) -> None:
    if delta.ndim != 4 or delta.shape[1] != 3:
        raise ValueError(f"delta must have shape (N, 3, H, W), got {tuple(delta.shape)}")


def grey_energy_share(delta: Tensor) -> float:
    """Share of δ's energy in its grey component (equal R, G, B); δ: (N, 3, H, W), any scale. 0 for δ = 0."""
    _check_delta(delta)
    d = delta.double()
    grey = d.mean(dim=1, keepdim=True)
    total = float(d.square().sum())
    return 0.0 if total == 0 else float(grey.square().sum()) * 3 / total


def class_mean_cosine(delta: Tensor, labels: Tensor) -> float:
    """Mean over images of cos(δ_i, the mean δ of i's class); δ: (N, 3, H, W), labels: (N,) int64.

    An image whose δ or class mean is zero counts as 0. Raises ValueError when the shapes disagree.
    """
    _check_delta(delta)
    if labels.shape != (delta.shape[0],):
        raise ValueError(f"labels must have shape ({delta.shape[0]},), got {tuple(labels.shape)}")
    flat = delta.double().flatten(1)
    classes, index = labels.unique(return_inverse=True)
    sums = torch.zeros(len(classes), flat.shape[1], dtype=flat.dtype).index_add_(0, index, flat)
    counts = torch.bincount(index, minlength=len(classes)).to(flat.dtype)
    means = sums / counts[:, None]
    cos = torch.nn.functional.cosine_similarity(flat, means[index], dim=1, eps=1e-12)
    return float(cos.mean())


def delta_statistics(delta: Tensor, labels: Tensor) -> dict[str, float]:
    """``{"grey_energy_share", "class_mean_cosine"}`` of δ (N, 3, H, W) with class labels (N,), rounded to 4 places."""
    return {
        "grey_energy_share": round(grey_energy_share(delta), 4),
        "class_mean_cosine": round(class_mean_cosine(delta, labels), 4),
    }
