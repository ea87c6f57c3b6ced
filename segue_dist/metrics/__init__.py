"""Evaluation metrics (library code: tensors in, tensors/floats out, no I/O)."""

from __future__ import annotations

from segue_dist.metrics.image_quality import (
    LPIPS,
    MS_SSIM_MIN_SIDE,
    MS_SSIM_WEIGHTS,
    PSNR_CAP_DB,
    image_quality,
    image_quality_per_image,
    linf,
    lpips,
    lpips_available,
    mae,
    ms_ssim,
    psnr,
    rmse,
    ssim,
)

__all__ = [
    "LPIPS",
    "MS_SSIM_MIN_SIDE",
    "MS_SSIM_WEIGHTS",
    "PSNR_CAP_DB",
    "image_quality",
    "image_quality_per_image",
    "linf",
    "lpips",
    "lpips_available",
    "mae",
    "ms_ssim",
    "psnr",
    "rmse",
    "ssim",
]
