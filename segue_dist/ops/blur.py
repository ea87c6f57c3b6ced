"""Gaussian blur: the one implementation behind the distortion layer's and the attacker's blur."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` float images, differentiable; same shape out.

    Reflect padding and kernel as torchvision's ``gaussian_blur`` (equal to it within float rounding); images too
    small to reflect (a side <= kernel_size // 2) are padded by replication instead. No defaults on purpose: the
    callers' differ and live in their configs (distortion layer: kernel 3, σ 0.2, a mild blur G must survive;
    attacker: kernel 5, σ 1.0, what a victim's trainer might apply). Raises ``ValueError`` for a tensor that is not
    4-D or an even or non-positive ``kernel_size``.
    """
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be odd and >= 1, got {kernel_size}")
    half = kernel_size // 2
    coords = torch.arange(kernel_size, dtype=torch.float32, device=x.device) - half
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > half else "replicate"
    out = F.pad(x, (half, half, half, half), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
