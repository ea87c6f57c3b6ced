"""Evaluation metrics (library code: tensors in, tensors/floats out, no I/O).

The batch summary is exported as ``quality_summary``: exporting it as ``image_quality`` would shadow the
``image_quality`` submodule on the package.
"""

from __future__ import annotations

from segue_dist.metrics.image_quality import (
    LPIPS,
    MS_SSIM_MIN_SIDE,
    MS_SSIM_WEIGHTS,
    PSNR_CAP_DB,
    image_quality_per_image,
    linf,
    lpips,
    lpips_available,
    mae,
    ms_ssim,
    psnr,
    psnr_from_mse,
    rmse,
    ssim,
)
from segue_dist.metrics.image_quality import (
    image_quality as quality_summary,
)

__all__ = [
    "LPIPS",
    "MS_SSIM_MIN_SIDE",
    "MS_SSIM_WEIGHTS",
    "PSNR_CAP_DB",
    "quality_summary",
    "image_quality_per_image",
    "linf",
    "lpips",
    "lpips_available",
    "mae",
    "ms_ssim",
    "psnr",
    "psnr_from_mse",
    "rmse",
    "ssim",
]
