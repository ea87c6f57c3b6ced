"""Full-reference image-quality metrics for perturbed images (Segue paper, Table III).

Every metric takes two batches ``x`` (reference) and ``y`` (distorted) of shape ``(B, C, H, W)`` in ``[0, 1]`` and
returns a per-image ``(B,)`` tensor, so callers can aggregate over uneven batches themselves (a mean of batch means is
wrong when the last batch is short). :func:`image_quality` is the convenience summary that averages over one batch.

Conventions shared with scikit-image / piq / pytorch_msssim so numbers are comparable with published tables:

* SSIM is Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population (not sample)
  covariance, *valid* filtering (no padding: border pixels whose window leaves the image are dropped), computed per
  channel and averaged over channels. This equals ``skimage.metrics.structural_similarity(x, y, channel_axis=0,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
* MS-SSIM is Wang et al. 2003 with 5 scales and weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); contrast-structure
  and SSIM terms are clamped at 0 before the weighted product (as piq / pytorch_msssim / TF do) so a negative
  correlation cannot produce NaN from a fractional power. Downsampling is 2x2 average pooling with one pixel of padding
  on odd sides (piq / pytorch_msssim behaviour). It needs ``min(H, W) >= 161`` (= (11 - 1) * 2**4 + 1) so the 11x11
  window still fits at the coarsest scale; smaller images raise ``ValueError``.
* SSIM / MS-SSIM / PSNR / MAE / RMSE are computed in float64 (except on MPS, which has no float64): these are
  evaluation numbers, accuracy matters more than speed, and float32 ``E[x^2] - E[x]^2`` loses digits on flat regions.
* LPIPS (Zhang et al. 2018) is built from *local* weight files only; nothing is downloaded. Without the learned linear
  layers ("lin", LPIPS v0.1) the model is the uncalibrated "baseline" variant (uniform channel weights) and says so via
  ``LPIPS.calibrated``; its numbers are NOT comparable with published LPIPS values.

Library module: no I/O except reading the weight files passed explicitly to :meth:`LPIPS.from_local`, no printing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    "psnr_from_mse",
    "rmse",
    "ssim",
]

# Standard MS-SSIM scale weights (Wang, Simoncelli & Bovik 2003), finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SSIM_WIN = 11
_SSIM_SIGMA = 1.5
_K1 = 0.01
_K2 = 0.03
# (win - 1) * 2**(scales - 1) + 1: the coarsest of 5 scales must still hold one full 11x11 window.
MS_SSIM_MIN_SIDE = (_SSIM_WIN - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1
# Summary PSNR for identical images: the per-image value is +inf (exact), but one identical pair would make a batch
# mean infinite and hide every other image, so :func:`image_quality` caps each image at this value before averaging.
PSNR_CAP_DB = 100.0


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{name}: x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected (B, C, H, W) tensors, got shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{name}: x and y shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"{name}: expected floating-point images in [0, 1], got {x.dtype} and {y.dtype}")


def _hi_precision(t: Tensor) -> Tensor:
    # MPS has no float64; everything else gets the extra digits for free at evaluation batch sizes.
    return t.float() if t.device.type == "mps" else t.double()


def _per_image_mean(t: Tensor) -> Tensor:
    return t.flatten(1).mean(dim=1)


def _gaussian_window_1d(size: int, sigma: float, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Same taps as scipy.ndimage.gaussian_filter with truncate=3.5 at sigma=1.5 (radius 5), which skimage uses.
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(t: Tensor, win: Tensor) -> Tensor:
    """Separable Gaussian filter per channel, 'valid' (output shrinks by win-1 on each axis)."""
    c = t.shape[1]
    k = win.numel()
    wh = win.view(1, 1, 1, k).expand(c, 1, 1, k)
    wv = win.view(1, 1, k, 1).expand(c, 1, k, 1)
    return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)


def _ssim_components(x: Tensor, y: Tensor, data_range: float, win: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean SSIM and mean contrast-structure term, each ``(B, C)``."""
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    mu_x = _filter_valid(x, win)
    mu_y = _filter_valid(y, win)
    # Population (biased) moments, i.e. skimage use_sample_covariance=False.
    sigma_xx = _filter_valid(x * x, win) - mu_x * mu_x
    sigma_yy = _filter_valid(y * y, win) - mu_y * mu_y
    sigma_xy = _filter_valid(x * y, win) - mu_x * mu_y
    cs_map = (2.0 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    lum_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    ssim_map = lum_map * cs_map
    return ssim_map.mean(dim=(2, 3)), cs_map.mean(dim=(2, 3))


def _check_ssim_size(x: Tensor, name: str) -> None:
    h, w = x.shape[-2:]
    if min(h, w) < _SSIM_WIN:
        raise ValueError(
            f"{name}: images must be at least {_SSIM_WIN}x{_SSIM_WIN} for the {_SSIM_WIN}x{_SSIM_WIN} window, got {h}x{w}"
        )


# --------------------------------------------------------------------------------------------------------------------
# pixel metrics
# --------------------------------------------------------------------------------------------------------------------
def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, ``(B,)``. Identical images give ``+inf`` (not an error)."""
    _check_pair(x, y, "psnr")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    mse = _per_image_mean((_hi_precision(x) - _hi_precision(y)) ** 2)
    # mse == 0 -> log10(inf) = +inf, which is the exact answer; no epsilon, so tiny errors are not distorted.
    return (10.0 * torch.log10(data_range**2 / mse)).to(x.dtype)


def psnr_from_mse(mse: float, data_range: float = 1.0, cap: float = PSNR_CAP_DB) -> float:
    """PSNR in dB of one image from its mean squared error (in ``data_range`` units, e.g. 255 for uint8 levels),
    capped at ``cap`` (default :data:`PSNR_CAP_DB`): identical images (``mse == 0``) give ``cap``, because the value
    goes into JSON, which has no infinity, and into means. Same formula as :func:`psnr`, for callers that already
    hold the error (protect's per-file checks, CPU and GPU)."""
    if mse == 0.0:
        return cap
    return min(cap, 10.0 * math.log10(data_range**2 / mse))


def mae(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error per image, ``(B,)``, in the images' units ([0, 1])."""
    _check_pair(x, y, "mae")
    return _per_image_mean((_hi_precision(x) - _hi_precision(y)).abs()).to(x.dtype)


def rmse(x: Tensor, y: Tensor) -> Tensor:
    """Root-mean-square error per image, ``(B,)``: sqrt of each image's MSE (then callers average over images)."""
    _check_pair(x, y, "rmse")
    return _per_image_mean((_hi_precision(x) - _hi_precision(y)) ** 2).sqrt().to(x.dtype)


def linf(x: Tensor, y: Tensor) -> Tensor:
    """Largest absolute pixel difference per image, ``(B,)``; checks an L-infinity budget such as 8/255."""
    _check_pair(x, y, "linf")
    return (x - y).abs().flatten(1).amax(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# structural metrics
# --------------------------------------------------------------------------------------------------------------------
def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per image, ``(B,)`` (Gaussian 11x11, sigma 1.5, valid filtering, channel-averaged).

    Matches ``skimage.metrics.structural_similarity(..., channel_axis=0, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)`` to float precision.
    """
    _check_pair(x, y, "ssim")
    _check_ssim_size(x, "ssim")
    xd, yd = _hi_precision(x), _hi_precision(y)
    win = _gaussian_window_1d(_SSIM_WIN, _SSIM_SIGMA, dtype=xd.dtype, device=xd.device)
    s, _ = _ssim_components(xd, yd, data_range, win)
    return s.mean(dim=1).to(x.dtype)


def ms_ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> Tensor:
    """Multi-scale SSIM per image, ``(B,)``.

    Raises ``ValueError`` when ``min(H, W) < 161`` (with 5 scales): the 11x11 window no longer fits at the coarsest
    scale. Callers evaluating small images should skip MS-SSIM (``image_quality`` omits it).
    """
    _check_pair(x, y, "ms_ssim")
    scales = len(weights)
    if scales < 1:
        raise ValueError("ms_ssim: weights must not be empty")
    min_side = (_SSIM_WIN - 1) * 2 ** (scales - 1) + 1
    h, w = x.shape[-2:]
    if min(h, w) < min_side:
        raise ValueError(
            f"ms_ssim: images are {h}x{w} but {scales}-scale MS-SSIM with an {_SSIM_WIN}x{_SSIM_WIN} window needs "
            f"min(H, W) >= {min_side}; skip MS-SSIM for images this small"
        )
    xd, yd = _hi_precision(x), _hi_precision(y)
    win = _gaussian_window_1d(_SSIM_WIN, _SSIM_SIGMA, dtype=xd.dtype, device=xd.device)
    wts = torch.tensor(list(weights), dtype=xd.dtype, device=xd.device)
    terms: list[Tensor] = []
    for scale in range(scales):
        s, cs = _ssim_components(xd, yd, data_range, win)
        if scale < scales - 1:
            terms.append(cs)
            # Pad odd sides by one so no row/column is silently dropped (piq / pytorch_msssim convention).
            pad = (xd.shape[-2] % 2, xd.shape[-1] % 2)
            xd = F.avg_pool2d(xd, kernel_size=2, padding=pad)
            yd = F.avg_pool2d(yd, kernel_size=2, padding=pad)
        else:
            terms.append(s)
    stacked = torch.relu(torch.stack(terms, dim=0))  # (scales, B, C); relu avoids NaN from (negative) ** fraction
    per_channel = torch.prod(stacked ** wts.view(-1, 1, 1), dim=0)
    return per_channel.mean(dim=1).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------------------------------
# Layer taps into torchvision's ``features`` Sequential, identical to the official LPIPS (richzhang/PerceptualSimilarity):
# each slice ends right after a ReLU. Channel counts are those of the learned 1x1 "lin" layers.
_LPIPS_NETS: dict[str, dict[str, object]] = {
    "alex": {"cuts": (2, 5, 8, 10, 12), "channels": (64, 192, 384, 256, 256), "min_side": 32},
    "vgg": {"cuts": (4, 9, 16, 23, 30), "channels": (64, 128, 256, 512, 512), "min_side": 16},
}
# LPIPS ScalingLayer constants (applied to inputs already mapped to [-1, 1]).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# Keys a torchvision classification checkpoint carries besides ``features.*``; LPIPS does not use them, so they are the
# only extra keys tolerated when loading a full-model state dict.
_TV_HEAD_PREFIXES = ("classifier.", "avgpool.")


def _load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p), device="cpu"))
    # weights_only=True: never unpickle arbitrary objects from a file a user passed in.
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return dict(obj)


def _backbone_features(net: str) -> nn.Sequential:
    import torchvision

    # weights=None: architecture only, never a download; the caller's local file supplies the weights. Built on the
    # meta device so the unused classifier head (58M params for AlexNet, 124M for VGG16) is never allocated or
    # initialised; the conv layers are then materialised and given PyTorch's default init (overwritten by from_local).
    with torch.device("meta"):
        model = torchvision.models.alexnet(weights=None) if net == "alex" else torchvision.models.vgg16(weights=None)
    features = model.features.to_empty(device="cpu")
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return features


def _features_state_dict(sd: Mapping[str, Tensor], path: str) -> dict[str, Tensor]:
    """Accept a full torchvision model state dict (``features.*`` + head) or a features-only one (``0.weight``...)."""
    keys = list(sd)
    if any(k.startswith("features.") for k in keys):
        stray = [k for k in keys if not k.startswith("features.") and not k.startswith(_TV_HEAD_PREFIXES)]
        if stray:
            raise ValueError(f"{path}: unexpected keys in backbone state dict: {stray[:5]}")
        return {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    return dict(sd)


def _lin_state_dict(sd: Mapping[str, Tensor], n_layers: int, path: str) -> dict[str, Tensor]:
    """Normalise the official LPIPS v0.1 lin file (``lin{i}.model.1.weight``) or our ``lins.{i}.weight`` layout."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("lins."):
            out[k] = v
            continue
        # official: lin0.model.1.weight (model = Sequential(Dropout, Conv2d)); older/other dumps: lin0.model.weight
        head, _, rest = k.partition(".")
        if head.startswith("lin") and head[3:].isdigit() and rest in ("model.1.weight", "model.weight", "weight"):
            out[f"lins.{int(head[3:])}.weight"] = v
        else:
            raise ValueError(f"{path}: unexpected key {k!r} in LPIPS lin weights")
    expected = {f"lins.{i}.weight" for i in range(n_layers)}
    if set(out) != expected:
        raise ValueError(f"{path}: LPIPS lin weights must hold exactly {sorted(expected)}, got {sorted(out)}")
    return out


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018) with an AlexNet or VGG16 backbone.

    ``forward(x, y)`` takes images in [0, 1] and returns a ``(B,)`` distance: inputs are mapped to [-1, 1], shifted and
    scaled by the LPIPS ScalingLayer, passed through the frozen backbone, each tapped feature map is unit-normalised
    along channels, the squared difference is weighted per channel (learned 1x1 "lin" conv, or all ones), averaged over
    space and summed over the five layers.

    ``calibrated`` is True only when the official LPIPS v0.1 lin weights were loaded; the uncalibrated "baseline"
    variant (uniform weights, as ``lpips.LPIPS(lpips=False)``) ranks perturbations sensibly but its values are not
    comparable with published LPIPS numbers such as the paper's Table III.
    """

    shift: Tensor
    scale: Tensor

    def __init__(self, net: Literal["alex", "vgg"] = "alex", *, calibrated: bool = False) -> None:
        super().__init__()
        if net not in _LPIPS_NETS:
            raise ValueError(f"LPIPS: net must be one of {sorted(_LPIPS_NETS)}, got {net!r}")
        spec = _LPIPS_NETS[net]
        self.net = net
        self.calibrated = calibrated
        self.min_side = int(spec["min_side"])  # type: ignore[call-overload]
        cuts: tuple[int, ...] = spec["cuts"]  # type: ignore[assignment]
        channels: tuple[int, ...] = spec["channels"]  # type: ignore[assignment]
        self.features = _backbone_features(net)
        self.cuts = cuts
        # 1x1 conv without bias, as the official NetLinLayer; ones = baseline variant (plain sum over channels).
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)
        for lin in self.lins:
            nn.init.ones_(lin.weight)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)  # a metric: frozen; gradients still flow to the *inputs* if they require them
        self.eval()

    @classmethod
    def from_local(
        cls,
        backbone_weights: str | os.PathLike[str],
        lin_weights: str | os.PathLike[str] | None = None,
        net: Literal["alex", "vgg"] = "alex",
    ) -> LPIPS:
        """Build from local files only (``.safetensors`` or a ``torch.save``'d state dict, loaded ``weights_only``).

        ``backbone_weights``: torchvision ``alexnet`` / ``vgg16`` ImageNet state dict (full model or ``features`` only).
        ``lin_weights``: the official LPIPS v0.1 ``alex.pth`` / ``vgg.pth``; ``None`` gives the uncalibrated variant.
        Loading is strict: missing, unexpected or mis-shaped keys raise.
        """
        model = cls(net, calibrated=lin_weights is not None)
        feats = _features_state_dict(_load_state_dict(backbone_weights), str(backbone_weights))
        model.features.load_state_dict(feats, strict=True)
        if lin_weights is not None:
            lins = _lin_state_dict(_load_state_dict(lin_weights), len(model.lins), str(lin_weights))
            model.lins.load_state_dict({k[len("lins.") :]: v for k, v in lins.items()}, strict=True)
        return model

    def extra_repr(self) -> str:
        variant = "LPIPS v0.1 lin weights" if self.calibrated else "UNCALIBRATED baseline (uniform weights)"
        return f"net={self.net!r}, calibrated={self.calibrated} [{variant}]"

    def _taps(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        start = 0
        for cut in self.cuts:
            for layer in self.features[start:cut]:
                x = layer(x)
            out.append(x)
            start = cut
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y, "LPIPS")
        if x.shape[1] != 3:
            raise ValueError(f"LPIPS: expected 3-channel images, got {x.shape[1]} channels")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_side:
            raise ValueError(f"LPIPS({self.net}): images must be at least {self.min_side}px on each side, got {h}x{w}")
        dtype = self.shift.dtype
        # One backbone pass over both images (halves kernel launches; BN-free nets so batching is exact).
        both = torch.cat([x, y], dim=0).to(dtype)
        both = ((both * 2.0 - 1.0) - self.shift) / self.scale
        total = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        for feat, lin in zip(self._taps(both), self.lins, strict=True):
            fx, fy = feat.chunk(2, dim=0)
            # Same epsilon as the official normalize_tensor: outside the sqrt, so all-zero (dead ReLU) pixels give 0.
            fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total


def lpips(x: Tensor, y: Tensor, net: LPIPS) -> Tensor:
    """LPIPS distance per image, ``(B,)``, using a model built with :meth:`LPIPS.from_local`."""
    if not isinstance(net, LPIPS):
        raise TypeError(f"lpips: net must be an LPIPS module, got {type(net).__name__}")
    p = next(net.parameters())
    return net(x.to(p.device), y.to(p.device)).to(x.device)


def lpips_available(
    backbone_weights: str | os.PathLike[str] | None,
    lin_weights: str | os.PathLike[str] | None = None,
) -> tuple[bool, str]:
    """Whether LPIPS can be built from these local files, and a human-readable reason.

    ``(True, ...)`` also when only the backbone is present; the reason then says the result is the uncalibrated
    variant. This checks presence and readability only; :meth:`LPIPS.from_local` validates the contents strictly.
    """
    if backbone_weights is None or str(backbone_weights) == "":
        return False, "LPIPS disabled: no backbone weights path given (AlexNet/VGG16 ImageNet state dict)"
    bp = Path(backbone_weights)
    if not bp.is_file():
        return False, f"LPIPS disabled: backbone weights not found at {bp}"
    if bp.stat().st_size == 0:
        return False, f"LPIPS disabled: backbone weights file {bp} is empty"
    if not os.access(bp, os.R_OK):
        return False, f"LPIPS disabled: backbone weights file {bp} is not readable"
    if lin_weights is None or str(lin_weights) == "":
        return True, f"LPIPS uncalibrated (baseline variant, uniform weights): no lin weights given; backbone {bp}"
    lp = Path(lin_weights)
    if not lp.is_file():
        return (
            False,
            f"LPIPS disabled: lin weights not found at {lp} (pass lin_weights=None for the uncalibrated variant)",
        )
    if lp.stat().st_size == 0 or not os.access(lp, os.R_OK):
        return False, f"LPIPS disabled: lin weights file {lp} is empty or unreadable"
    return True, f"LPIPS v0.1 calibrated: backbone {bp}, lin {lp}"


# --------------------------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def image_quality_per_image(
    x: Tensor,
    y: Tensor,
    lpips_model: LPIPS | None = None,
    data_range: float = 1.0,
) -> dict[str, Tensor]:
    """All metrics per image (``(B,)`` each, on CPU, float64). Use this to aggregate over many batches.

    Keys: ``psnr`` (raw: +inf for identical images), ``ssim``, ``ms_ssim`` (only when ``min(H, W) >= 161``; omitted
    otherwise, no placeholder key), ``lpips`` (only when a model is given), ``mae``, ``rmse``, ``linf``.
    """
    _check_pair(x, y, "image_quality")
    out: dict[str, Tensor] = {"psnr": psnr(x, y, data_range), "ssim": ssim(x, y, data_range)}
    if min(x.shape[-2:]) >= MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = ms_ssim(x, y, data_range)
    if lpips_model is not None:
        out["lpips"] = lpips(x, y, lpips_model)
    out["mae"] = mae(x, y)
    out["rmse"] = rmse(x, y)
    out["linf"] = linf(x, y)
    return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()}


def image_quality(
    x: Tensor,
    y: Tensor,
    lpips_model: LPIPS | None = None,
    data_range: float = 1.0,
    psnr_cap: float = PSNR_CAP_DB,
) -> dict[str, float]:
    """Batch means of every metric (see :func:`image_quality_per_image` for the keys).

    PSNR: each image's value is capped at ``psnr_cap`` dB (default 100) before averaging, so identical pairs count as
    100 dB instead of turning the mean into +inf. ``linf`` is the batch *max* (a budget check), the others are means.
    """
    if not math.isfinite(psnr_cap) or psnr_cap <= 0:
        raise ValueError(f"image_quality: psnr_cap must be a finite positive number, got {psnr_cap}")
    per = image_quality_per_image(x, y, lpips_model, data_range)
    summary: dict[str, float] = {}
    for key, vals in per.items():
        if key == "psnr":
            summary[key] = float(vals.clamp(max=psnr_cap).mean())
        elif key == "linf":
            summary[key] = float(vals.max())
        else:
            summary[key] = float(vals.mean())
    return summary
