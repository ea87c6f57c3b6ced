"""Segue perturbation generator G (paper section III-A/B).

G maps a clean image ``x`` in [0, 1] and an identity label ``y`` to a perturbation ``delta`` with
``|delta| <= eps`` everywhere. The label enters as side information: its exact ``bits``-bit binary code
(MSB first, so ``y = 5`` -> ``0...0101``) is broadcast over the bottleneck feature map, concatenated with the
image features and fused back to ``4C`` channels by one convolution (paper III-A, following [21]).

Architecture (``C = width``)::

    x ─ pad to /4 ─ conv3x3 s1 C ─ conv3x3 s2 2C ─ conv3x3 s2 4C          (each IN(affine) + ReLU)
        ─ cat(bits broadcast) ─ conv3x3 4C + ReLU                          (fusion, no norm: see below)
        ─ num_res_blocks x [conv-N-ReLU-conv-N + skip]
        ─ convT s2 2C ─ convT s2 C (N + ReLU) ─ conv3x3 3 ─ tanh * eps ─ crop

N, the norm after the fusion, is ``decoder_norm``: ``none`` by default, ``instance`` as an option. The code enters
as a per-sample, spatially constant offset of the fused features, the kind of offset InstanceNorm removes; without
a norm there the offsets reach the output directly. Measured on glint24 at 32 px (16 epochs, no distortion,
ResNet-18 victim at 63% on clean data): clean-test accuracy 67% with InstanceNorm after the fusion, 58% with
BatchNorm (the paper's figure), 44% with none. The encoder keeps InstanceNorm: it sees only the image.

``label_at_output`` also concatenates the bit code to the input of the output conv, at full resolution. Fused only
at the bottleneck, the spatially constant code leaves G through two stride-2 transposed convolutions as a
period-2/4 lattice (the checkerboard in the residual pictures): the highest spatial frequencies, which a stride-2
stem, down-sampling and JPEG remove. At full resolution it can also set a low-frequency, per-identity offset. Measured
on CPU (glint24 32 px, standard-stem ResNet-18 victim with flip + crop, 59.6% clean): 40.8% with it and the down-up
rescale distortion after 26 epochs, 46.7% after 16, against 54.6% for the default at 16 epochs. Off by default: the
GPU results in the README were measured without it.

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
    label_at_output: bool = False  # also feed the bit code to the output conv, at full resolution (see below)

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


def broadcast_code(code: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The (B, bits) code as a (B, bits, H, W) map, constant over space, matching ``features``' size and dtype."""
    return code.to(features.dtype)[:, :, None, None].expand(-1, -1, features.shape[-2], features.shape[-1])


def make_norm(channels: int, kind: str) -> tuple[nn.Module, bool]:
    """(InstanceNorm(affine) or nothing, whether the conv before it needs a bias: a norm would subtract one).

    Never BatchNorm (the paper's figure): each image's perturbation must not depend on whatever else is in its
    batch, and must be the same in train and eval mode, for a tool applied image by image at corpus scale.
    """
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True), False
    return nn.Identity(), True


class ConvNormReLU(nn.Sequential):
    """conv -> norm (InstanceNorm or none) -> ReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        transposed: bool = False,
        norm: str = "instance",
    ) -> None:
        norm_layer, bias = make_norm(out_ch, norm)
        if transposed:
            # kernel 3, padding 1, output_padding 1: exactly doubles the size.
            conv: nn.Module = nn.ConvTranspose2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                output_padding=stride - 1,
                bias=bias,
            )
        else:
            # Reflect padding at stride 1 avoids a dark frame in the perturbation; strided convs keep zeros.
            conv = nn.Conv2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                padding_mode="reflect" if stride == 1 else "zeros",
                bias=bias,
            )
        super().__init__(OrderedDict(conv=conv, norm=norm_layer, act=nn.ReLU(inplace=True)))


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
        # Fusion of image features and the broadcast bit code. No norm here: the code is constant over space, so
        # conv(code) is a per-channel constant, exactly what InstanceNorm subtracts (see decoder_norm).
        self.fuse = nn.Conv2d(4 * c + bits, 4 * c, 3, padding=1, padding_mode="reflect")
        norm = self.config.decoder_norm
        self.blocks = nn.Sequential(*[ResidualBlock(4 * c, norm) for _ in range(self.config.num_res_blocks)])
        self.decoder = nn.Sequential(
            ConvNormReLU(4 * c, 2 * c, 3, 2, transposed=True, norm=norm),
            ConvNormReLU(2 * c, c, 3, 2, transposed=True, norm=norm),
        )
        head_in = c + (bits if self.config.label_at_output else 0)
        self.head = nn.Conv2d(head_in, 3, 3, padding=1, padding_mode="reflect")
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
        side = broadcast_code(code, h)
        h = F.relu(self.fuse(torch.cat([h, side], dim=1)))
        h = self.blocks(h)
        h = self.decoder(h)
        if self.config.label_at_output:
            h = torch.cat([h, broadcast_code(code, h)], dim=1)
        # tanh in float32 (even under bf16 autocast) so the bound is exact and the output dtype is the image dtype.
        delta = torch.tanh(self.head(h).float()) * self._bound
        # tanh saturates to exactly +-1 in float32, so this clamp only guards against rounding in the product.
        delta = delta.clamp(-self._bound, self._bound)
        return delta[..., :height, :width]

    def perturb(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The protected image ``clamp(x + G(x, y), 0, 1)``."""
        return (x + self(x, labels)).clamp(0.0, 1.0)
