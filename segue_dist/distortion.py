"""Distortion layer T between the protected image ``x + delta`` and the surrogate f (paper III-C, IV-A).

During generator training the perturbation only counts if it still works *after* what an attacker may do to the
published image. The layer simulates, in this order (the order things happen to a real image)::

    JPEG re-encode (storage)  ->  down-and-up rescale (training resolution)
    ->  Gaussian blur  ->  sharpness  ->  h/v flips (training augmentation)
    ->  PGD step on the surrogate (the attacker's adversarial training, computed on f's actual input)

Paper settings: adversarial radius rho_d = 1/255, Gaussian blur 3x3 sigma 0.2, sharpness factor 2, flips p 0.1.
Additions: a differentiable JPEG approximation (quality down to 10) and an antialiased down-and-up rescale
(scale down to 0.25), because re-encoding and lower-resolution training are the cheapest ways an attacker can
wash out a high-frequency perturbation.

Per-op probabilities (``mode="chain"``: every enabled op is applied independently to each sample with its own
probability) and why:

* ``blur_p = 1.0``: the paper's blur is torchvision ``GaussianBlur((3, 3), 0.2)``, which is always applied. At
  sigma 0.2 the neighbour weight is ~4e-6, so it is close to the identity and costs f nothing.
* ``sharpness_p = 0.5``: torchvision ``RandomAdjustSharpness(2)``'s default. Sharpening *amplifies* the
  perturbation's high frequencies; applying it always would teach G patterns that only work when amplified.
* ``hflip_p = vflip_p = 0.1``: the paper.
* ``jpeg_p = rescale_p = 0.5``: these two remove most of the perturbation at their strong end (JPEG-10, 1/4
  scale). Applied to every sample, f would mostly see washed-out perturbations, G's loss would be dominated by
  cases where little survives and training would stall; at 0.5 half of each batch is undistorted by them, so G
  gets a clean signal *and* pressure to move energy into what survives (low-frequency, block-aligned structure).
* PGD is applied to every sample whenever ``pgd`` is on (it is the attacker's adversarial training).

``mode="one_of"`` instead picks exactly one of the enabled signal-degrading ops (JPEG, rescale, blur, sharpness)
per sample, uniformly (the "combined noise" of HiDDeN); flips and PGD behave as in ``chain``.

The JPEG simulation (:func:`jpeg_compress_differentiable`) follows libjpeg/PIL: YCbCr, 4:2:0, 8x8 DCT, the
quality-scaled IJG tables, 8-bit rounding; its forward output is within ~1/255 mean absolute difference of PIL at
quality 10-90 (tests compare against PIL). Quantisation rounding is exact forward with Shin & Song's cubic gradient
backward (``jpeg_rounding="cubic_st"``), so f sees what a real re-encode leaves while G learns that energy in
coefficients JPEG zeroes is wasted.

Randomness comes only from the ``generator`` passed to ``forward`` (a ``torch.Generator`` or an int seed) or, when
none is given, from torch's default CPU generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segue_dist.ops.blur import gaussian_blur
from segue_dist.ops.losses import view_cross_entropy
from segue_dist.ops.pgd import pgd_delta
from segue_dist.ops.pgd import uniform as _uniform

__all__ = [
    "DistortionConfig",
    "DistortionLayer",
    "adjust_sharpness",
    "gaussian_blur",
    "jpeg_compress_differentiable",
    "jpeg_quant_tables",
    "pgd_perturbation",
    "random_translate",
    "rescale_down_up",
    "to_grayscale",
]

_MODES = ("chain", "one_of")
_ROUNDINGS = ("cubic_st", "cubic", "ste")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(name: str, value: object) -> None:
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ValueError(f"{name} must have min <= max, got {value!r}")
    return lo, hi


@dataclass
class DistortionConfig:
    """Switches and ranges of :class:`DistortionLayer`; see the module docstring for the default probabilities."""

    mode: str = "chain"
    pgd: bool = True
    pgd_radius: float = 1 / 255
    pgd_steps: int = 1
    blur: bool = True
    blur_kernel: int = 3
    blur_sigma: float = 0.2
    blur_p: float = 1.0
    sharpness: bool = True
    sharpness_factor: float = 2.0
    sharpness_p: float = 0.5
    hflip_p: float = 0.1
    vflip_p: float = 0.1
    jpeg: bool = True
    jpeg_quality: tuple[int, int] = (10, 95)
    jpeg_p: float = 0.5
    jpeg_chroma_subsampling: bool = True
    jpeg_rounding: str = "cubic_st"
    rescale: bool = True
    rescale_range: tuple[float, float] = (0.25, 1.0)
    rescale_p: float = 0.5
    # The victim's own augmentation and colour attacks (off by default: the paper's layer has neither).
    translate_p: float = 0.0  # random crop after reflect padding by translate_frac of the side (the victim's crop)
    translate_frac: float = 0.125
    grayscale_p: float = 0.0  # BT.601 luma on all three channels (grayscale and ISS attackers)
    # The down-scaled short side never goes below this: no attacker trains a face model on 8 px thumbnails, and at
    # 32-64 px (CPU-scale runs) a 1/4 scale would wipe out identity and perturbation alike.
    rescale_min_side: int = 16

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if not _is_number(self.pgd_radius) or self.pgd_radius < 0:
            raise ValueError(f"pgd_radius must be >= 0, got {self.pgd_radius!r}")
        if isinstance(self.pgd_steps, bool) or not isinstance(self.pgd_steps, int) or self.pgd_steps < 1:
            raise ValueError(f"pgd_steps must be an integer >= 1, got {self.pgd_steps!r}")
        if (
            isinstance(self.blur_kernel, bool)
            or not isinstance(self.blur_kernel, int)
            or self.blur_kernel < 1
            or self.blur_kernel % 2 == 0
        ):
            raise ValueError(f"blur_kernel must be an odd positive integer, got {self.blur_kernel!r}")
        if not _is_number(self.blur_sigma) or self.blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma!r}")
        if not _is_number(self.sharpness_factor) or self.sharpness_factor < 0:
            raise ValueError(f"sharpness_factor must be >= 0, got {self.sharpness_factor!r}")
        if not _is_number(self.translate_frac) or not 0.0 <= self.translate_frac <= 0.5:
            raise ValueError(f"translate_frac must be in [0, 0.5], got {self.translate_frac!r}")
        for name in (
            "blur_p",
            "sharpness_p",
            "hflip_p",
            "vflip_p",
            "jpeg_p",
            "rescale_p",
            "translate_p",
            "grayscale_p",
        ):
            _check_probability(name, getattr(self, name))
        if self.jpeg_rounding not in _ROUNDINGS:
            raise ValueError(f"jpeg_rounding must be one of {', '.join(_ROUNDINGS)}, got {self.jpeg_rounding!r}")
        q_lo, q_hi = _check_pair("jpeg_quality", self.jpeg_quality)
        if not (q_lo.is_integer() and q_hi.is_integer() and q_lo >= 1 and q_hi <= 100):
            raise ValueError(f"jpeg_quality must be integers within 1..100, got {self.jpeg_quality!r}")
        self.jpeg_quality = (int(q_lo), int(q_hi))
        s_lo, s_hi = _check_pair("rescale_range", self.rescale_range)
        if not 0.0 < s_lo <= s_hi <= 1.0:
            raise ValueError(f"rescale_range must satisfy 0 < min <= max <= 1, got {self.rescale_range!r}")
        self.rescale_range = (s_lo, s_hi)
        if (
            isinstance(self.rescale_min_side, bool)
            or not isinstance(self.rescale_min_side, int)
            or self.rescale_min_side < 1
        ):
            raise ValueError(f"rescale_min_side must be an integer >= 1, got {self.rescale_min_side!r}")


# --------------------------------------------------------------------------------------------------------------
# Differentiable image operations. All take and return (B, C, H, W) float images in [0, 1].
# --------------------------------------------------------------------------------------------------------------


def adjust_sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision/PIL ``adjust_sharpness`` for float images, differentiable.

    Blends the image with a smoothed copy (kernel ``[[1,1,1],[1,5,1],[1,1,1]] / 13``, border pixels unsmoothed):
    ``factor * x + (1 - factor) * smooth``; ``factor > 1`` extrapolates away from the smooth image (sharpens).
    """
    channels, height, width = x.shape[1:]
    if height <= 2 or width <= 2:
        return x
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(channels, 1, 3, 3)
    smooth = F.pad(F.conv2d(x, kernel, groups=channels), (1, 1, 1, 1))
    border = torch.ones(height, width, dtype=torch.bool, device=x.device)
    border[1:-1, 1:-1] = False
    smooth = torch.where(border, x, smooth)
    return (factor * x + (1.0 - factor) * smooth).clamp(0.0, 1.0)


def rescale_down_up(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Antialiased bilinear downscale by ``scale`` then bilinear upscale back to exactly (H, W)."""
    height, width = x.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size == (height, width):
        return x
    small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of (B, 3, H, W), repeated on the three channels (what a grayscale or ISS attacker trains on)."""
    weights = torch.tensor(_RGB_TO_YCC[0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).expand_as(x)


def random_translate(x: torch.Tensor, frac: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the reflect-padded image (pad = frac x side on each border): the victim's crop augmentation.

    Offsets are drawn per sample, uniformly in [0, 2 pad]; the output has the input's size. Differentiable in x.
    """
    b, _, h, w = x.shape
    ph, pw = min(h - 1, round(h * frac)), min(w - 1, round(w * frac))
    if ph == 0 and pw == 0:
        return x
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    oy = torch.floor(_uniform((b,), generator) * (2 * ph + 1)).long().tolist()
    ox = torch.floor(_uniform((b,), generator) * (2 * pw + 1)).long().tolist()
    return torch.stack([padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] for i in range(b)])


# --- JPEG ------------------------------------------------------------------------------------------------------

# ITU-T T.81 Annex K base tables (what libjpeg/IJG and PIL scale by quality), natural (row-major) order.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)
# JFIF full-range RGB -> YCbCr (offset 128 on the chroma planes added separately) and its inverse as libjpeg uses.
_RGB_TO_YCC = (
    (0.299, 0.587, 0.114),
    (-0.168735892, -0.331264108, 0.5),
    (0.5, -0.418687589, -0.081312411),
)
_YCC_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136286, -0.714136286),
    (1.0, 1.772, 0.0),
)


def jpeg_quant_tables(quality: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Luminance and chrominance tables ``(B, 8, 8)`` (float64) for quality 1..100, as libjpeg builds them.

    libjpeg's ``jpeg_quality_scaling``: ``scale = 5000 / q`` (integer division) below 50, else ``200 - 2 q``;
    entry ``= (base * scale + 50) // 100`` clamped to 1..255 (baseline, as PIL encodes). Integer qualities match
    libjpeg exactly; fractional ones extend the same formula.
    """
    q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1).cpu()
    if bool(((q < 1) | (q > 100)).any()):
        raise ValueError(f"JPEG quality must be within 1..100, got {q.tolist()}")
    scale = torch.where(q < 50, torch.floor(5000.0 / q), 200.0 - 2.0 * q)[:, None, None]

    def scaled(base: Sequence[Sequence[int]]) -> torch.Tensor:
        table = torch.tensor(base, dtype=torch.float64)
        return torch.floor((table * scale + 50.0) / 100.0).clamp(1.0, 255.0)

    return scaled(_LUMA_TABLE), scaled(_CHROMA_TABLE)


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II; ``D @ block @ D.T`` is exactly the JPEG FDCT (1/4 C(u) C(v) normalisation)."""
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2.0 * n[None, :] + 1.0) * n[:, None] * math.pi / 16.0) * 0.5
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(device=device, dtype=torch.float32)


def _round_ste(z: torch.Tensor) -> torch.Tensor:
    """Exact rounding forward, identity gradient."""
    return z + (torch.round(z) - z).detach()


def _round_differentiable(z: torch.Tensor, rounding: str) -> torch.Tensor:
    """Rounding of quantised DCT coefficients (in units of the quantisation step).

    ``"cubic"`` is Shin & Song (2017): value ``r + (z - r)^3`` with ``r = round(z)``, gradient ``3 (z - r)^2``.
    That gradient vanishes for coefficients well inside a step (e.g. small high-frequency content that JPEG
    deletes), so G is told that energy there is wasted, which an identity gradient (``"ste"``) hides. The cubic
    *value* however leaks up to 1/8 of a step. ``"cubic_st"`` (default) keeps the exact rounded value forward and
    uses the cubic gradient backward: the forward pass is real JPEG (up to 8-bit rounding details), the backward
    pass keeps Shin & Song's dead-zone information.
    """
    r = torch.round(z)
    if rounding == "cubic":
        return r + (z - r) ** 3
    if rounding == "cubic_st":
        cubic = (z - r) ** 3
        return r + (cubic - cubic.detach())
    if rounding == "ste":
        return z + (r - z).detach()
    raise ValueError(f"rounding must be one of {', '.join(_ROUNDINGS)}, got {rounding!r}")


def _block_quantise(plane: torch.Tensor, table: torch.Tensor, rounding: str) -> torch.Tensor:
    """8x8 block DCT -> quantise with per-sample ``table`` (B, 8, 8) -> dequantise -> IDCT. H, W multiples of 8."""
    b, c, h, w = plane.shape
    d = _dct_matrix(plane.device)
    blocks = plane.reshape(b, c, h // 8, 8, w // 8, 8)
    coef = torch.einsum("ui,bcminj,vj->bcmunv", d, blocks, d)
    t = table.to(device=plane.device, dtype=plane.dtype)[:, None, None, :, None, :]
    coef = _round_differentiable(coef / t, rounding) * t
    return torch.einsum("ui,bcmunv,vj->bcminj", d, coef, d).reshape(b, c, h, w)


def jpeg_compress_differentiable(
    x: torch.Tensor,
    quality: float | torch.Tensor,
    *,
    chroma_subsampling: bool = True,
    rounding: str = "cubic_st",
) -> torch.Tensor:
    """Differentiable approximation of a baseline JPEG encode/decode round trip (libjpeg/PIL defaults).

    ``x``: RGB (B, 3, H, W) in [0, 1]; ``quality``: scalar or per-sample (B,) in 1..100. Steps: RGB -> YCbCr (JFIF)
    rounded to 8 bits, replicate-pad to whole MCUs (16 px with 4:2:0, else 8; libjpeg also replicates edges),
    4:2:0 chroma by 2x2 averaging, 8x8 block DCT, quantisation with the quality-scaled IJG tables and
    differentiable rounding (see ``_round_differentiable``: ``"cubic_st"``, ``"cubic"`` or ``"ste"``), IDCT, chroma
    upsampling by bilinear interpolation (= libjpeg's "fancy" triangle upsampling at 2x), YCbCr -> RGB, rounding
    to 8-bit pixels, crop, clamp to [0, 1]. The 8-bit roundings are straight-through (identity gradient).
    Not modelled: libjpeg's fixed-point arithmetic (integer DCT, intermediate roundings), which leaves a mean
    absolute difference of about 0.5/255 from PIL at quality 100, and entropy coding (lossless).
    Computed in float32 with autocast disabled, since rounding to quantisation steps needs the precision.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(_ROUNDINGS)}, got {rounding!r}")
    batch, _, height, width = x.shape
    luma_q, chroma_q = jpeg_quant_tables(quality)
    if luma_q.shape[0] not in (1, batch):
        raise ValueError(f"quality must be a scalar or have shape ({batch},), got {luma_q.shape[0]} values")
    in_dtype = x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        rgb = x.float() * 255.0
        to_ycc = torch.tensor(_RGB_TO_YCC, device=x.device, dtype=torch.float32)
        ycc = torch.einsum("ij,bjhw->bihw", to_ycc, rgb)  # chroma centred on 0 (= value - 128), luma in [0, 255]
        # libjpeg converts to 8-bit YCbCr samples; rounding them (straight-through) matches its input exactly.
        ycc = _round_ste(ycc)

        mcu = 16 if chroma_subsampling else 8
        pad_h, pad_w = -height % mcu, -width % mcu
        if pad_h or pad_w:
            ycc = F.pad(ycc, (0, pad_w, 0, pad_h), mode="replicate")
        luma, chroma = ycc[:, :1] - 128.0, ycc[:, 1:]
        if chroma_subsampling:
            chroma = F.avg_pool2d(chroma, 2)

        luma = _block_quantise(luma, luma_q, rounding) + 128.0
        chroma = _block_quantise(chroma, chroma_q, rounding)
        if chroma_subsampling:
            chroma = F.interpolate(chroma, scale_factor=2.0, mode="bilinear", align_corners=False)

        to_rgb = torch.tensor(_YCC_TO_RGB, device=x.device, dtype=torch.float32)
        out = torch.einsum("ij,bjhw->bihw", to_rgb, torch.cat([luma, chroma], dim=1))
        out = _round_ste(out)  # the decoder writes 8-bit pixels
        out = (out[..., :height, :width] / 255.0).clamp(0.0, 1.0)
    return out.to(in_dtype)


# --- PGD -------------------------------------------------------------------------------------------------------


def pgd_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    radius: float,
    steps: int = 1,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The distortion layer's PGD: ``adv`` (detached, ``|adv| <= radius``) that increases ``CE(model(x + adv))``
    (the mean over the views of a multi-view surrogate: `segue_dist.ops.losses.view_cross_entropy`).

    :func:`segue_dist.ops.pgd_delta` with the paper's setting: one step is FGSM from 0; more steps start at a
    uniform random point (Madry et al.). See there for modes, gradients and bounds.
    """
    return pgd_delta(
        model,
        x,
        labels,
        radius=radius,
        steps=steps,
        random_start=steps > 1,
        step_size=step_size,
        generator=generator,
        loss_fn=view_cross_entropy,
    )


# --------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------


def _apply_masked(x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(x)`` where ``mask`` (CPU bool (B,)) is set, ``x`` elsewhere; skips the work when no sample is chosen."""
    if not bool(mask.any()):
        return x
    y = fn(x)
    if bool(mask.all()):
        return y
    # torch.where keeps shapes static; the gradient flows only through the branch each sample took.
    return torch.where(mask.to(x.device)[:, None, None, None], y, x)


class DistortionLayer(nn.Module):
    """Random, differentiable attacker distortions; ``forward(x, model, labels, generator)`` -> distorted ``x``.

    Gradients flow to ``x`` through every op (so to G). The PGD part is added as a constant (straight-through):
    it needs the surrogate ``model`` and its targets ``labels`` when ``config.pgd`` is on. The layer has no
    parameters and behaves the same in train and eval mode; call it only where distortion is wanted.
    """

    def __init__(self, config: DistortionConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DistortionConfig()

    def extra_repr(self) -> str:
        return repr(self.config)

    def _degrading_ops(self) -> list[tuple[str, float]]:
        cfg = self.config
        ops = [
            ("jpeg", cfg.jpeg, cfg.jpeg_p),
            ("rescale", cfg.rescale, cfg.rescale_p),
            ("blur", cfg.blur, cfg.blur_p),
            ("sharpness", cfg.sharpness, cfg.sharpness_p),
        ]
        return [(name, p) for name, enabled, p in ops if enabled]

    def _masks(self, batch: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        ops = self._degrading_ops()
        if not ops:
            return {}
        if self.config.mode == "one_of":
            choice = torch.floor(_uniform((batch,), generator) * len(ops)).long().clamp_max(len(ops) - 1)
            return {name: choice == i for i, (name, _) in enumerate(ops)}
        draws = _uniform((len(ops), batch), generator)
        return {name: draws[i] < p for i, (name, p) in enumerate(ops)}

    def forward(
        self,
        x: torch.Tensor,
        model: nn.Module | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | int | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
        use_pgd = cfg.pgd and cfg.pgd_radius > 0
        if use_pgd and (model is None or labels is None):
            raise ValueError("DistortionConfig.pgd is on: pass the surrogate model and labels (or set pgd=False)")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        batch = x.shape[0]
        masks = self._masks(batch, generator)
        # The image ops run in float32 even under autocast: bf16 keeps only ~1/256 of resolution near 1.0, the size
        # of the perturbation's fine structure. Only the surrogate's forward in PGD uses the caller's autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            # Values outside [0, 1] (an unclipped x + delta) are clipped first, as any image encoder would.
            out = x.to(torch.promote_types(x.dtype, torch.float32)).clamp(0.0, 1.0)
            if cfg.grayscale_p > 0:
                out = _apply_masked(out, _uniform((batch,), generator) < cfg.grayscale_p, to_grayscale)
            if "jpeg" in masks:
                q_lo, q_hi = cfg.jpeg_quality
                span = q_hi - q_lo + 1
                quality = q_lo + torch.floor(_uniform((batch,), generator) * span).clamp_max(span - 1)
                out = _apply_masked(
                    out,
                    masks["jpeg"],
                    lambda t: jpeg_compress_differentiable(
                        t, quality, chroma_subsampling=cfg.jpeg_chroma_subsampling, rounding=cfg.jpeg_rounding
                    ),
                )
            if "rescale" in masks:
                # One scale per call (a resampled batch must share its size); it is redrawn at every step.
                s_lo, s_hi = cfg.rescale_range
                scale = s_lo + (s_hi - s_lo) * float(_uniform((1,), generator))
                scale = min(1.0, max(scale, cfg.rescale_min_side / min(out.shape[-2:])))
                out = _apply_masked(out, masks["rescale"], lambda t: rescale_down_up(t, scale))
            if "blur" in masks:
                out = _apply_masked(out, masks["blur"], lambda t: gaussian_blur(t, cfg.blur_kernel, cfg.blur_sigma))
            if "sharpness" in masks:
                out = _apply_masked(out, masks["sharpness"], lambda t: adjust_sharpness(t, cfg.sharpness_factor))
            flips = _uniform((2, batch), generator)
            out = _apply_masked(out, flips[0] < cfg.hflip_p, lambda t: t.flip(-1))
            out = _apply_masked(out, flips[1] < cfg.vflip_p, lambda t: t.flip(-2))
            if cfg.translate_p > 0:
                moved = _uniform((batch,), generator) < cfg.translate_p
                out = _apply_masked(out, moved, lambda t: random_translate(t, cfg.translate_frac, generator))

        if use_pgd:
            assert model is not None and labels is not None
            adv = pgd_perturbation(model, out, labels, cfg.pgd_radius, cfg.pgd_steps, generator=generator)
            # Straight-through: adv is a constant, so d(out + adv)/d(out) is the identity and G still gets gradients.
            out = out + adv
        return out.clamp(0.0, 1.0)
