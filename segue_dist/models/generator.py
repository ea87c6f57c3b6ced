"""Segue perturbation generator G (paper section III-A/B).

G maps a clean image ``x`` in [0, 1] and an identity label ``y`` to a perturbation ``delta`` with
``|delta| <= eps`` everywhere. The label enters as side information: its exact ``bits``-bit binary code
(MSB first, so ``y = 5`` -> ``0...0101``), as a map (the code broadcast over space, the paper; or its spatial
template, see ``side_info``) concatenated with the bottleneck features and fused back to ``4C`` channels by one
convolution (paper III-A, following [21]).

Architecture (``C = width``)::

    x ─ pad to /4 ─ conv3x3 s1 C ─ conv3x3 s2 2C ─ conv3x3 s2 4C          (each IN(affine) + ReLU)
        ─ cat(side information map) ─ conv3x3 4C + ReLU                    (fusion, no norm: see below)
        ─ num_res_blocks x [conv-N-ReLU-conv-N + skip]
        ─ up s2 2C ─ up s2 C (N + ReLU) ─ [cat(side map)] ─ conv3x3 3 [+ template skip] ─ tanh * eps ─ crop

N, the norm after the fusion, is ``decoder_norm``: ``none`` by default, ``instance`` as an option. The code enters
as a per-sample, spatially constant offset of the fused features, the kind of offset InstanceNorm removes; without
a norm there the offsets reach the output directly (measured: docs/measurements.md). The encoder keeps
InstanceNorm: it sees only the image.

``label_at_output`` also fuses the side information before the output conv, at full resolution.

Side information (``side_info``):

* ``constant`` (the paper): the bits, broadcast over space. Fused only at the bottleneck, a spatially constant code
  leaves G through the two stride-2 transposed convolutions as a period-2/4 lattice: the highest spatial
  frequencies, which a stride-2 stem, down-sampling, JPEG and a victim's random crop remove or scramble (README,
  Effectiveness: no protection at CPU scale).
* ``template``: an MLP decodes the bits into a ``template_channels x s x s`` map (``s = template_size``), resized
  bilinearly to each fusion point, so the code can draw per-identity *spatial* structure at a scale relative to the
  face (a 4x4 template is 8 px cells at 32 px, 28 px cells at 112 px). ``template_skip > 0`` adds a direct path
  from the template (1x1 conv at template resolution, resized, times the gain) to the pre-tanh output, so that G
  paints a coarse, saturated class-wise pattern from the first step; it measured worse than without it, so it is 0
  in the default recipe. Coarse colour structure is the pattern a victim learns first and that crops and half
  resolution keep (README Effectiveness and ``bench/results/protection/``: the ablation and the fixed-pattern
  probes).

``upsample=resize`` replaces the transposed convolutions by bilinear x2 + conv (no checkerboard), ``luma_weight``
spends that share of eps on one plane added equally to R, G and B (what a grayscale attacker keeps). Any 16-bit code
up to ``2**bits - 1`` gets a template, so labels unseen in training are still protected (paper: once-trained
multiple use).

Parameter names (``encoder.0.conv.weight`` ...) are the safetensors checkpoint keys: keep them stable.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GeneratorConfig", "SegueGenerator", "label_bits"]

# The encoder halves the resolution twice and the decoder doubles it twice, so the network sees inputs whose
# sides are multiples of 4; anything else is reflect-padded up to the next multiple and cropped back.
_DOWNSAMPLE = 4
# The bottleneck must keep at least 2x2 positions or InstanceNorm has nothing to normalise over.
_MIN_SIDE = 2 * _DOWNSAMPLE
_DECODER_NORMS = ("none", "instance")
_SIDE_INFO = ("constant", "template")
_UPSAMPLE = ("transposed", "resize")
# Hidden width of the MLP that decodes the bit code into the template.
_TEMPLATE_HIDDEN = 128


@dataclass
class GeneratorConfig:
    """Hyper-parameters of :class:`SegueGenerator`.

    ``num_classes`` only has to fit into ``bits`` bits: a trained G may be applied to another data set whose
    labels (or K-means pseudo-labels) go up to ``2**bits - 1`` (paper: "once-trained multiple-use generator").
    """

    num_classes: int = 10
    bits: int = 16
    width: int = 32
    num_res_blocks: int = 4
    eps: float = 8 / 255
    decoder_norm: str = "none"  # norm after the label fusion: none | instance (see the module docstring)
    label_at_output: bool = False  # also feed the side information to the output conv, at full resolution
    side_info: str = "constant"  # how the code enters: constant (broadcast bits, the paper) | template (spatial map)
    template_size: int = 8  # template: side of the code's spatial map (resized to each fusion point)
    template_channels: int = 16  # template: channels of that map
    upsample: str = (
        "transposed"  # decoder: transposed (stride-2 transposed convs, the paper) | resize (bilinear + conv)
    )
    luma_weight: float = 0.0  # share of eps spent on a luminance part (same delta on R, G, B) that grayscale keeps
    template_skip: float = 0.0  # template: gain of a direct path from the template to the output (0 = none)
    output_rms_gain: float = 0.0  # > 0: head output scaled to unit RMS per image, times this, before tanh

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be an integer in 1..32, got {self.bits!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if 2**self.bits < self.num_classes:
            need = max(1, math.ceil(math.log2(self.num_classes)))
            raise ValueError(
                f"bits={self.bits} can encode only {2**self.bits} labels but num_classes={self.num_classes}; "
                f"use bits >= {need}"
            )
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width!r}")
        if isinstance(self.num_res_blocks, bool) or not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be a non-negative integer, got {self.num_res_blocks!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {self.eps!r}")
        if not isinstance(self.label_at_output, bool):
            raise ValueError(f"label_at_output must be true or false, got {self.label_at_output!r}")
        if self.decoder_norm not in _DECODER_NORMS:
            raise ValueError(f"decoder_norm must be one of {', '.join(_DECODER_NORMS)}, got {self.decoder_norm!r}")
        if self.side_info not in _SIDE_INFO:
            raise ValueError(f"side_info must be one of {', '.join(_SIDE_INFO)}, got {self.side_info!r}")
        if self.upsample not in _UPSAMPLE:
            raise ValueError(f"upsample must be one of {', '.join(_UPSAMPLE)}, got {self.upsample!r}")
        for name in ("template_size", "template_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.template_skip, bool)
            or not isinstance(self.template_skip, (int, float))
            or self.template_skip < 0
        ):
            raise ValueError(f"template_skip must be >= 0, got {self.template_skip!r}")
        if self.template_skip and self.side_info != "template":
            raise ValueError("template_skip needs side_info=template")
        g = self.output_rms_gain
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise ValueError(f"output_rms_gain must be >= 0, got {g!r}")
        w = self.luma_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise ValueError(f"luma_weight must be in [0, 1], got {w!r}")


def label_bits(labels: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact ``bits``-bit binary code of integer labels, most significant bit first.

    ``labels``: integer tensor ``(B,)``. Returns float32 ``(B, bits)`` of 0/1, on ``labels.device``.
    Raises ``ValueError`` for a label outside ``[0, 2**bits)``: silently wrapping it would give two
    identities the same code and so the same protective perturbation.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"labels must be in [0, {2**bits - 1}] for bits={bits}, got range [{lo}, {hi}]")
    # Shift each label right by (bits-1 .. 0) and keep the lowest bit: column 0 is the MSB.
    shifts = torch.arange(bits - 1, -1, -1, device=labels.device, dtype=torch.long)
    return torch.bitwise_and(torch.bitwise_right_shift(labels.unsqueeze(1), shifts), 1).to(torch.float32)


def side_map(side: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Side information as a map of ``features``' size and dtype.

    A (B, bits) code is broadcast, constant over space (the paper); a (B, C, s, s) template is resized bilinearly,
    so the same template lands at the same relative place in an image of any size.
    """
    size = features.shape[-2:]
    if side.ndim == 2:
        return side.to(features.dtype)[:, :, None, None].expand(-1, -1, *size)
    return F.interpolate(side.float(), size=size, mode="bilinear", align_corners=False).to(features.dtype)


def make_norm(channels: int, kind: str) -> tuple[nn.Module, bool]:
    """(InstanceNorm(affine) or nothing, whether the conv before it needs a bias: a norm would subtract one).

    Never BatchNorm (the paper's figure): each image's perturbation must not depend on whatever else is in its
    batch, and must be the same in train and eval mode, for a tool applied image by image at corpus scale.
    """
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True), False
    return nn.Identity(), True


class ConvNormReLU(nn.Sequential):
    """conv -> norm (InstanceNorm or none) -> ReLU; ``upsample`` doubles the size first (transposed or resize)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        upsample: str = "",
        norm: str = "instance",
    ) -> None:
        norm_layer, bias = make_norm(out_ch, norm)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if upsample == "transposed":
            # kernel 3, padding 1, output_padding 1: exactly doubles the size.
            layers["conv"] = nn.ConvTranspose2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                output_padding=stride - 1,
                bias=bias,
            )
        else:
            if upsample == "resize":
                # Resize-convolution (Odena et al. 2016): no stride-2 transposed kernel, so no checkerboard lattice.
                layers["up"] = nn.Upsample(scale_factor=stride, mode="bilinear", align_corners=False)
                stride = 1
            # Reflect padding at stride 1 avoids a dark frame in the perturbation; strided convs keep zeros.
            layers["conv"] = nn.Conv2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                padding_mode="reflect" if stride == 1 else "zeros",
                bias=bias,
            )
        layers["norm"] = norm_layer
        layers["act"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class ResidualBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus identity skip (the CycleGAN / Johnson et al. block; EDSR's without a norm)."""

    def __init__(self, channels: int, norm: str = "instance") -> None:
        super().__init__()
        self.norm1, bias = make_norm(channels, norm)
        self.norm2, _ = make_norm(channels, norm)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return x + self.norm2(self.conv2(h))


class SegueGenerator(nn.Module):
    """Label-conditioned perturbation generator; ``forward(x, labels)`` returns ``delta`` with ``|delta| <= eps``."""

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GeneratorConfig()
        c, bits = self.config.width, self.config.bits
        self.encoder = nn.Sequential(
            ConvNormReLU(3, c, 3, 1),
            ConvNormReLU(c, 2 * c, 3, 2),
            ConvNormReLU(2 * c, 4 * c, 3, 2),
        )
        if self.config.side_info == "template":
            # Side information as a spatial map: an MLP decodes the code into template_channels x s x s, resized to
            # each fusion point. Any code up to 2**bits gets a template, so unseen labels are still protected.
            size, side_ch = self.config.template_size, self.config.template_channels
            self.template = nn.Sequential(
                nn.Linear(bits, _TEMPLATE_HIDDEN),
                nn.ReLU(inplace=True),
                nn.Linear(_TEMPLATE_HIDDEN, side_ch * size * size),
            )
        else:
            side_ch = bits
        # Fusion of image features and the side information. No norm here: a constant code makes conv(code) a
        # per-channel constant, exactly what InstanceNorm subtracts (see decoder_norm).
        self.fuse = nn.Conv2d(4 * c + side_ch, 4 * c, 3, padding=1, padding_mode="reflect")
        norm, up = self.config.decoder_norm, self.config.upsample
        self.blocks = nn.Sequential(*[ResidualBlock(4 * c, norm) for _ in range(self.config.num_res_blocks)])
        self.decoder = nn.Sequential(
            ConvNormReLU(4 * c, 2 * c, 3, 2, upsample=up, norm=norm),
            ConvNormReLU(2 * c, c, 3, 2, upsample=up, norm=norm),
        )
        head_in = c + (side_ch if self.config.label_at_output else 0)
        # With a luminance part the head has a fourth channel: one plane added equally to R, G and B.
        out_ch = 3 + (self.config.luma_weight > 0)
        self.head = nn.Conv2d(head_in, out_ch, 3, padding=1, padding_mode="reflect")
        if self.config.template_skip:
            # Direct path: the template, mapped to the output channels at its own (coarse) resolution and resized,
            # adds to the head's pre-tanh output. At initialisation G already paints a coarse class-wise pattern.
            self.template_out = nn.Conv2d(side_ch, out_ch, 1)
        # float32 bound used for the output. eps is a Python double; if its float32 rounding lies above it, step one
        # ulp down so |delta| <= eps holds in float32 *and* when compared as a double (e.g. after .item()).
        bound = torch.tensor(self.config.eps, dtype=torch.float32)
        if float(bound) > self.config.eps:
            bound = torch.nextafter(bound, torch.tensor(0.0))
        self._bound = float(bound)

    @property
    def eps(self) -> float:
        return self.config.eps

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, H, W) in [0, 1]; ``labels``: int (B,). Returns float32 ``delta`` of the same size."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        height, width = x.shape[-2:]
        if min(height, width) < _MIN_SIDE:
            raise ValueError(f"image sides must be >= {_MIN_SIDE} px, got {height}x{width}")
        code = label_bits(labels, self.config.bits)

        # Pad bottom/right to a multiple of 4 so that down- and up-sampling return exactly (H, W) after the crop.
        # Reflect padding adds at most 3 mirrored pixels: no resampling, so no blur of the perturbation, and the
        # cost is negligible compared with interpolating the output.
        pad_h, pad_w = -height % _DOWNSAMPLE, -width % _DOWNSAMPLE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")

        h = self.encoder(x)
        side = self.side_information(code)
        h = F.relu(self.fuse(torch.cat([h, side_map(side, h)], dim=1)))
        h = self.blocks(h)
        h = self.decoder(h)
        if self.config.label_at_output:
            h = torch.cat([h, side_map(side, h)], dim=1)
        out = self.head(h).float()
        if self.config.template_skip:
            out = out + self.config.template_skip * side_map(self.template_out(side.float()), out)
        # tanh in float32 (even under bf16 autocast) so the bound is exact and the output dtype is the image dtype.
        delta = self.bounded(out)
        # tanh saturates to exactly +-1 in float32, so this clamp only guards against rounding in the product.
        delta = delta.clamp(-self._bound, self._bound)
        return delta[..., :height, :width]

    def side_information(self, code: torch.Tensor) -> torch.Tensor:
        """(B, bits) code -> what is fused: the code itself, or its (B, template_channels, s, s) template."""
        if self.config.side_info == "constant":
            return code
        size = self.config.template_size
        return self.template(code).view(code.shape[0], -1, size, size)

    def bounded(self, out: torch.Tensor) -> torch.Tensor:
        """Head output (B, 3 or 4, H, W) -> delta with |delta| <= eps: tanh per channel, luminance plane mixed in.

        With ``output_rms_gain`` the output is first scaled to unit RMS per image (times the gain): G then chooses
        the pattern, not its size, and cannot drive tanh into saturation, where its gradient vanishes and G stops
        learning (measured: docs/measurements.md).
        """
        if self.config.output_rms_gain:
            out = self.config.output_rms_gain * out * torch.rsqrt(out.square().mean((1, 2, 3), keepdim=True) + 1e-6)
        w = self.config.luma_weight
        if w == 0:
            return torch.tanh(out) * self._bound
        return (w * torch.tanh(out[:, :1]) + (1 - w) * torch.tanh(out[:, 1:])) * self._bound

    def perturb(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The protected image ``clamp(x + G(x, y), 0, 1)``."""
        return (x + self(x, labels)).clamp(0.0, 1.0)
