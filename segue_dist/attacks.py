"""What an attacker may do to protected data before and while training a victim (Segue paper, Section IV-D).

Two kinds of transform:

* **data-level**, applied once to the uint8 training images before training, as an attacker would do to a scraped
  set: JPEG re-encoding at quality q (real PIL JPEG), grayscale, ISS (grayscale + JPEG-10, Liu et al. 2023), training
  at a lower resolution (antialiased down-sampling), and partial protection (only a fraction of the images protected).
* **batch-level**, applied to every float batch during training, differentiable where that matters: the standard
  flip + crop every victim uses, Cutout (2 patches of half the image side), Mixup (λ ~ Beta(1, 1)), CutMix, Gaussian
  blur (kernel 5, σ 1) and PGD adversarial training (Madry et al.) with an L∞ radius ρ_a.
* **set-level**, which needs the labels of the whole training set: Orthogonal Projection (Sandoval-Segura et al.,
  "What Can We Learn from Unlearnable Datasets?", NeurIPS 2023, Section 4.4), which fits a linear classifier to the
  protected set and removes the subspace its weights span from every training image.

Every random choice takes an explicit ``torch.Generator`` (always a CPU one, so a seeded run is reproducible on any
device). Library module: tensors in, tensors out; no file I/O, no printing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from segue_dist.ops.blur import gaussian_blur
from segue_dist.ops.pgd import pgd_delta
from segue_dist.utils.seed import derive_seed

Augment = Literal["none", "cutout", "mixup", "cutmix", "blur"]
AUGMENTS: tuple[str, ...] = ("none", "cutout", "mixup", "cutmix", "blur")
# ITU-R BT.601 luma, the weights torchvision's rgb_to_grayscale and PIL's convert("L") use.
_LUMA = (0.299, 0.587, 0.114)
ISS_JPEG_QUALITY = 10

__all__ = [
    "AUGMENTS",
    "AttackerConfig",
    "cutmix",
    "cutout",
    "downscale",
    "downscaled_size",
    "flip_crop",
    "gaussian_blur",
    "grayscale",
    "jpeg_compress",
    "mixup",
    "one_hot",
    "orthogonal_projection",
    "pgd_linf",
    "select_protected",
    "train_batch_transform",
    "transform_images",
]


# ----------------------------------------------------------------------------------------------------------- config


@dataclass
class AttackerConfig:
    """One attacker setting. All defaults = a plain victim (standard flip + crop only, no attack)."""

    name: str = "none"
    augment: Augment = "none"
    adv_rho: float = 0.0  # PGD radius ρ_a in [0, 1] units (4/255 ...); 0 = no adversarial training
    adv_steps: int = 5
    adv_step_size: float = 0.0  # 0 = 2.5 * ρ_a / steps (Madry et al.)
    jpeg_quality: int = 0  # 0 = off; else the training set is re-encoded once at this quality
    grayscale: bool = False
    iss: bool = False  # grayscale + JPEG-10 (Image Shortcut Squeezing)
    resolution: int = 0  # 0 = the images' own size; else down-sample train AND test so the short side is this
    scale: float = 1.0  # the same, relative: 0.5 = half the resolution (one config for 32 px and 224 px runs)
    orthogonal_projection: bool = False  # remove what a linear model learns from the training set (set-level)
    protected_fraction: float = 1.0  # share of training images taken from the protected set (by key, seeded)
    standard_augment: bool = True  # random flip + crop (pad = side / 8), what every victim trains with
    cutout_holes: int = 2
    cutout_frac: float = 0.5  # patch side as a fraction of the image side (paper: 112 px of 224)
    mix_alpha: float = 1.0  # Beta(α, α) for Mixup / CutMix; α = 1 is uniform λ
    blur_kernel: int = 5
    blur_sigma: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not 0.0 <= self.adv_rho <= 1.0:
            raise ValueError(f"adv_rho must be in [0, 1] (e.g. 4/255), got {self.adv_rho}")
        if self.adv_steps < 1:
            raise ValueError(f"adv_steps must be >= 1, got {self.adv_steps}")
        if self.adv_step_size < 0:
            raise ValueError(f"adv_step_size must be >= 0, got {self.adv_step_size}")
        if not (self.jpeg_quality == 0 or 1 <= self.jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality must be 0 (off) or in 1..100, got {self.jpeg_quality}")
        if self.iss and (self.jpeg_quality or self.grayscale):
            raise ValueError("iss already means grayscale + JPEG-10; do not also set jpeg_quality or grayscale")
        if self.resolution < 0 or 0 < self.resolution < 8:
            raise ValueError(f"resolution must be 0 (off) or >= 8, got {self.resolution}")
        if not 0.0 < self.scale <= 1.0 or (self.scale < 1.0 and self.resolution):
            raise ValueError(f"scale must be in (0, 1] and not combined with resolution, got {self.scale}")
        if not 0.0 <= self.protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1], got {self.protected_fraction}")
        if self.cutout_holes < 1 or not 0.0 < self.cutout_frac <= 1.0:
            raise ValueError(f"cutout needs holes >= 1 and 0 < frac <= 1, got {self.cutout_holes}, {self.cutout_frac}")
        if self.mix_alpha <= 0:
            raise ValueError(f"mix_alpha must be > 0, got {self.mix_alpha}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0 or self.blur_sigma <= 0:
            raise ValueError(f"blur needs an odd kernel >= 1 and sigma > 0, got {self.blur_kernel}, {self.blur_sigma}")

    @property
    def step_size(self) -> float:
        return self.adv_step_size or 2.5 * self.adv_rho / self.adv_steps

    @property
    def effective_jpeg(self) -> int:
        return ISS_JPEG_QUALITY if self.iss else self.jpeg_quality

    @property
    def effective_grayscale(self) -> bool:
        return self.iss or self.grayscale

    def train_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) the victim trains and tests at, for images stored at (height, width)."""
        if self.resolution:
            return downscaled_size(height, width, self.resolution)
        if self.scale < 1.0:
            return downscaled_size(height, width, max(1, round(min(height, width) * self.scale)))
        return height, width

    @property
    def group(self) -> str:
        """The robustness family this setting belongs to (a report table each); 'combined' if several are set."""
        active = [
            g
            for g, on in (
                ("adversarial", self.adv_rho > 0),
                ("jpeg", self.jpeg_quality > 0),
                ("grayscale", self.grayscale),
                ("iss", self.iss),
                ("augment", self.augment != "none"),
                ("resolution", self.resolution > 0 or self.scale < 1.0),
                ("partial", self.protected_fraction < 1.0),
                ("projection", self.orthogonal_projection),
            )
            if on
        ]
        if not active:
            return "none"
        return active[0] if len(active) == 1 else "combined"


# ------------------------------------------------------------------------------------------------ data-level (uint8)


def grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> 3-channel luma (BT.601). Keeps dtype: uint8 in gives rounded uint8 out."""
    _check_images(x, "grayscale")
    weights = torch.tensor(_LUMA, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    luma = (x.float() * weights).sum(dim=1, keepdim=True)
    if x.dtype == torch.uint8:
        return luma.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return luma.to(x.dtype).expand(-1, 3, -1, -1).contiguous()


def jpeg_compress(x: Tensor, quality: int) -> Tensor:
    """Real PIL JPEG round trip of every image (default 4:2:0 chroma subsampling, as an attacker's tools would).

    uint8 in -> uint8 out; float [0, 1] in -> float out (quantised to 8 bits first). Not differentiable: this is a
    data transform, applied once before training.
    """
    _check_images(x, "jpeg_compress")
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg_compress: quality must be in 1..100, got {quality}")
    as_uint8 = x if x.dtype == torch.uint8 else x.detach().clamp(0, 1).mul(255).round().to(torch.uint8)
    out = torch.empty_like(as_uint8, device="cpu")
    for i, image in enumerate(as_uint8.cpu()):
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = torch.from_numpy(np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    out = out.to(x.device)
    return out if x.dtype == torch.uint8 else out.to(x.dtype).div(255.0)


def downscaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side at ``short_side`` and the aspect ratio kept; never upsamples."""
    scale = min(1.0, short_side / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def downscale(x: Tensor, short_side: int) -> Tensor:
    """Antialiased bilinear down-sampling so the short side is ``short_side`` (no-op when already that small).

    Differentiable for float input; uint8 in -> rounded uint8 out.
    """
    _check_images(x, "downscale")
    size = downscaled_size(x.shape[-2], x.shape[-1], short_side)
    if size == tuple(x.shape[-2:]):
        return x
    out = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    if x.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(x.dtype)


def transform_images(x: Tensor, cfg: AttackerConfig, *, train: bool, labels: Tensor | None = None) -> Tensor:
    """The attacker's one-off data transforms for a uint8 image batch, in the order an attacker would apply them.

    Training images: grayscale (or ISS's) -> JPEG re-encode -> down-sample -> Orthogonal Projection (which needs
    ``labels``, (N,) int64, and raises ValueError without them). Test images: only the transforms that are part of
    the attacker's model input pipeline (grayscale and resolution); JPEG and the projection are done to the scraped
    training data, so clean test images stay as they are.
    """
    if cfg.effective_grayscale:
        x = grayscale(x)
    if train and cfg.effective_jpeg:
        x = jpeg_compress(x, cfg.effective_jpeg)
    h, w = cfg.train_size(x.shape[-2], x.shape[-1])
    if (h, w) != tuple(x.shape[-2:]):
        x = downscale(x, min(h, w))
    if train and cfg.orthogonal_projection:
        if labels is None:
            raise ValueError("orthogonal_projection needs the training labels (transform_images(..., labels=y))")
        x = orthogonal_projection(x, labels)
    return x


# ----------------------------------------------------------------------------------------- set-level (projection)


def fit_linear_classifier(
    x: Tensor, labels: Tensor, num_classes: int, *, epochs: int = 20, batch_size: int = 128, seed: int = 0
) -> Tensor:
    """Multinomial logistic regression on flattened images; x: (N, D) float, labels: (N,). Returns W: (K, D).

    Zero initialisation, Adam (lr 1e-3), ``epochs`` passes over shuffled mini-batches, no weight decay: the model of Orthogonal
    Projection (Sandoval-Segura et al. 2023, Section 4.4), which is meant to latch onto a class-wise pattern.
    """
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(model.weight)  # the weights then hold only what the data taught: no random directions to remove
    nn.init.zeros_(model.bias)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), labels[idx]).backward()
            opt.step()
    return model.weight.detach()


def orthogonal_projection(x: Tensor, labels: Tensor, *, epochs: int = 20, seed: int = 0) -> Tensor:
    """Orthogonal Projection (Sandoval-Segura et al., NeurIPS 2023, Section 4.4): x minus its part in span(W).

    x: (N, C, H, W) uint8 or float in [0, 1]; labels: (N,) int64 with values in [0, K). W (K, C·H·W) is a linear
    classifier fitted to the (protected) training set; an orthonormal basis Q of its rows (QR) gives
    x' = x - Q Qᵀ (x - μ) for every image, μ the training set's mean image: centred, so that what is removed is what
    tells the classes apart and not the mean face (clean test images, never projected, stay in distribution).
    uint8 in -> rounded, clipped uint8 out; float in -> float out, unclipped.
    """
    _check_images(x, "orthogonal_projection")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"orthogonal_projection: labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    flat = x.detach().cpu().float().flatten(1) / scale
    weights = fit_linear_classifier(flat, labels.cpu(), int(labels.max()) + 1, epochs=epochs, seed=seed)
    q, _ = torch.linalg.qr(weights.T)  # (D, K): orthonormal columns spanning the classifier's weights
    centred = flat - flat.mean(dim=0)
    projected = (flat - (centred @ q) @ q.T).view_as(x).to(x.device)
    if x.dtype == torch.uint8:
        return (projected * 255).round().clamp(0, 255).to(torch.uint8)
    return projected.to(x.dtype)


def select_protected(keys: Sequence[str], fraction: float, seed: int) -> list[bool]:
    """Which samples come from the protected set under partial protection: exactly round(fraction * n) of them.

    Chosen by a per-key hash, so the choice depends on the keys and seed only (not on read order), and the protected
    subset at fraction p is contained in the one at any larger fraction.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"select_protected: fraction must be in [0, 1], got {fraction}")
    count = round(fraction * len(keys))
    order = sorted(range(len(keys)), key=lambda i: (derive_seed(seed, "partial", keys[i]), keys[i]))
    chosen = set(order[:count])
    return [i in chosen for i in range(len(keys))]


# ----------------------------------------------------------------------------------------------- batch-level (float)


def _check_images(x: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected (B, 3, H, W) images, got shape {tuple(x.shape)}")


def _uniform(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    return torch.rand(tuple(shape), generator=generator)


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch's Beta sampler takes no generator; draw a numpy seed from the torch one so the run stays reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    """Integer labels -> float one-hot; already-soft (B, K) targets pass through."""
    if y.dim() == 2:
        return y.float()
    return F.one_hot(y, num_classes).float()


def flip_crop(x: Tensor, generator: torch.Generator | None, pad_frac: float = 0.125) -> Tensor:
    """Random horizontal flip + random crop after reflect padding (side / 8 each way): the standard victim recipe."""
    _check_images(x, "flip_crop")
    b, _, h, w = x.shape
    flip = _uniform((b,), generator) < 0.5
    x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(-1), x)
    ph, pw = max(1, round(h * pad_frac)), max(1, round(w * pad_frac))
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    oy = torch.randint(0, 2 * ph + 1, (b,), generator=generator).tolist()
    ox = torch.randint(0, 2 * pw + 1, (b,), generator=generator).tolist()
    return torch.stack([padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] for i in range(b)])


def _boxes(b: int, h: int, w: int, box_h: Tensor, box_w: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, H, W) bool masks of one box per image: centre uniform over the image, box clipped at the borders."""
    cy = (_uniform((b,), generator) * h).floor()
    cx = (_uniform((b,), generator) * w).floor()
    y0, y1 = (cy - box_h // 2).clamp(0, h), (cy + box_h - box_h // 2).clamp(0, h)
    x0, x1 = (cx - box_w // 2).clamp(0, w), (cx + box_w - box_w // 2).clamp(0, w)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    in_rows = (rows >= y0.view(b, 1, 1)) & (rows < y1.view(b, 1, 1))
    in_cols = (cols >= x0.view(b, 1, 1)) & (cols < x1.view(b, 1, 1))
    return in_rows & in_cols


def cutout(x: Tensor, generator: torch.Generator | None, holes: int = 2, size_frac: float = 0.5) -> Tensor:
    """Cutout (DeVries & Taylor 2017): zero ``holes`` square patches of ``size_frac`` x the side, per image."""
    _check_images(x, "cutout")
    b, _, h, w = x.shape
    box_h = torch.full((b,), float(max(1, round(h * size_frac))))
    box_w = torch.full((b,), float(max(1, round(w * size_frac))))
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for _ in range(holes):
        mask |= _boxes(b, h, w, box_h, box_w, generator)
    return x.masked_fill(mask.to(x.device).unsqueeze(1), 0.0)


def mixup(
    x: Tensor, y: Tensor, num_classes: int, generator: torch.Generator | None, alpha: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018): one λ ~ Beta(α, α) per batch, images and one-hot targets mixed with a permutation."""
    _check_images(x, "mixup")
    lam = _beta(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    targets = one_hot(y, num_classes)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def cutmix(
    x: Tensor, y: Tensor, num_classes: int, generator: torch.Generator | None, alpha: float = 1.0
) -> tuple[Tensor, Tensor]:
    """CutMix (Yun et al. 2019): paste a box of area (1 - λ) from a permuted image; targets mixed by the true area."""
    _check_images(x, "cutmix")
    b, _, h, w = x.shape
    lam = _beta(alpha, generator)
    cut = math.sqrt(1.0 - lam)
    mask = _boxes(1, h, w, torch.tensor([float(round(h * cut))]), torch.tensor([float(round(w * cut))]), generator)
    mask = mask.to(x.device).view(1, 1, h, w)
    perm = torch.randperm(b, generator=generator).to(x.device)
    mixed = torch.where(mask, x[perm], x)
    kept = 1.0 - mask.float().mean().item()  # λ after clipping at the border
    targets = one_hot(y, num_classes)
    return mixed, kept * targets + (1 - kept) * targets[perm]


def train_batch_transform(
    x: Tensor, y: Tensor, num_classes: int, cfg: AttackerConfig, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Per-batch training transforms: standard flip + crop, then the attacker's augmentation. Returns soft targets."""
    if cfg.standard_augment:
        x = flip_crop(x, generator)
    if cfg.augment == "cutout":
        x = cutout(x, generator, cfg.cutout_holes, cfg.cutout_frac)
    elif cfg.augment == "blur":
        x = gaussian_blur(x, cfg.blur_kernel, cfg.blur_sigma)
    elif cfg.augment == "mixup":
        return mixup(x, y, num_classes, generator, cfg.mix_alpha)
    elif cfg.augment == "cutmix":
        return cutmix(x, y, num_classes, generator, cfg.mix_alpha)
    return x, one_hot(y, num_classes)


# ------------------------------------------------------------------------------------------------ adversarial (PGD)


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    rho: float,
    steps: int = 5,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Tensor:
    """L∞ PGD with a uniform random start (Madry et al. 2018): ``x`` moved to the worst case in the ρ-ball,
    clipped to [0, 1]; ``(B, 3, H, W)`` in, same shape out (detached).

    :func:`segue_dist.ops.pgd_delta` (always a random start, 5 steps of ``2.5 * rho / steps`` by default; a
    ``step_size`` of 0 means that default). ``y`` may be integer labels or soft targets. The model runs in eval mode
    during the attack so its forward passes do not move BatchNorm statistics; every module's mode is restored.
    """
    _check_images(x, "pgd_linf")
    if rho <= 0:
        return x.detach()
    delta = pgd_delta(
        model, x, y, radius=rho, steps=steps, random_start=True, step_size=step_size or None, generator=generator,
        loss_fn=loss_fn,
    )  # fmt: skip
    return (x.detach() + delta).clamp(0, 1)
