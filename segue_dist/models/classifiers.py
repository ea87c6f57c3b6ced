"""Surrogate / victim classifier factory (torchvision backbones, no downloads).

Every model returned by :func:`build_classifier` is an :class:`ImageClassifier`: it takes images in [0, 1] and
applies the ImageNet mean/std normalisation as its first step, so the perturbation budget (eps) and the
adversarial radius (rho) of the whole project are in pixel units regardless of the architecture.

Small images (min side <= 112 px by default) get a small-image stem so a 32 px input is not reduced to a
single pixel before the first block:

* ``resnet18`` / ``resnet50``: conv1 becomes 3x3 stride 1 and the max-pool is dropped (the CIFAR ResNet recipe).
* ``mobilenet_v2`` / ``efficientnet_b1``: the first conv's stride becomes 1 (same weight shape).
* ``swin_t``: patch size 2 instead of 4. torchvision's Swin pads every stage's feature map to a multiple of the
  window size (7) and pads odd sizes before patch merging, so any input size runs without resizing; we keep
  the pixels as they are rather than resample them (resampling would itself weaken a pixel-space
  perturbation, which is not the attacker's architecture's job). Note torchvision attends over the padded zero
  tokens without a mask in non-shifted windows; that is stock torchvision behaviour, which is what an attacker
  would run.
* ``inception_v3``: the network needs at least 75 px, so inputs with a smaller side are upsampled inside the
  wrapper (bilinear, aspect ratio kept) at *any* setting of ``small_stem``; its stem is left unchanged.

Weights: ``pretrained`` is a local file (safetensors, or a torch ``state_dict`` read with ``weights_only=True``).
Loading is strict, except that a classifier head whose shape differs (another ``num_classes``) is left freshly
initialised and listed in ``model.reinitialized_keys`` (and logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageClassifier",
    "MinSize",
    "Normalize",
    "build_classifier",
    "count_parameters",
    "load_backbone_weights",
]

logger = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v2", "inception_v3", "efficientnet_b1", "swin_t")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Auto small stem at or below this many pixels on the shorter side.
SMALL_STEM_MAX_SIDE = 112
# torchvision's Inception v3 fails below 75 px (its last feature map would be empty).
INCEPTION_MIN_SIDE = 75

# State-dict prefix of each architecture's classification head (the part that depends on num_classes).
_HEAD_PREFIX = {
    "resnet18": "fc.",
    "resnet50": "fc.",
    "mobilenet_v2": "classifier.",
    "inception_v3": "fc.",
    "efficientnet_b1": "classifier.",
    "swin_t": "head.",
}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel. Buffers are non-persistent: they are constants, not checkpoint state."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MinSize(nn.Module):
    """Bilinearly upsample so the shorter side is at least ``min_side`` (aspect ratio kept); else identity."""

    def __init__(self, min_side: int) -> None:
        super().__init__()
        self.min_side = min_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        short = min(height, width)
        if short >= self.min_side:
            return x
        scale = self.min_side / short
        size = (max(self.min_side, math.ceil(height * scale)), max(self.min_side, math.ceil(width * scale)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"min_side={self.min_side}"


class ImageClassifier(nn.Module):
    """``backbone(resize(normalize(x)))`` for ``x`` in [0, 1]. Weights live under ``backbone.``."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        arch: str,
        num_classes: int,
        image_size: tuple[int, int],
        small_stem: bool,
        resize: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.resize = resize if resize is not None else nn.Identity()
        self.backbone = backbone
        self.arch = arch
        self.num_classes = num_classes
        self.image_size = image_size
        self.small_stem = small_stem
        self.reinitialized_keys: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.resize(self.normalize(x)))


def _image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


def _cifar_resnet_stem(model: tvm.ResNet) -> None:
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init torchvision uses for every conv of a ResNet.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def _set_first_stride_1(model: nn.Module) -> None:
    conv = model.features[0][0]  # type: ignore[index]
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected the first conv at features[0][0], found {type(conv).__name__}")
    conv.stride = (1, 1)


def _build_backbone(arch: str, num_classes: int, small_stem: bool) -> tuple[nn.Module, nn.Module | None]:
    """Randomly initialised torchvision model with ``num_classes`` outputs, plus an optional input resize."""
    # weights=None everywhere: the factory never downloads anything.
    if arch in ("resnet18", "resnet50"):
        model: nn.Module = getattr(tvm, arch)(weights=None, num_classes=num_classes)
        if small_stem:
            _cifar_resnet_stem(model)  # type: ignore[arg-type]
        return model, None
    if arch in ("mobilenet_v2", "efficientnet_b1"):
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
        if small_stem:
            _set_first_stride_1(model)
        return model, None
    if arch == "inception_v3":
        # aux_logits must be False below 299 px; init_weights=True silences torchvision's warning and gives the
        # reference truncated-normal init. transform_input stays False: normalisation is done by the wrapper.
        model = tvm.inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)
        return model, MinSize(INCEPTION_MIN_SIDE)
    if arch == "swin_t":
        model = tvm.swin_t(weights=None, num_classes=num_classes)
        if small_stem:
            old = model.features[0][0]  # type: ignore[index]
            model.features[0][0] = nn.Conv2d(3, old.out_channels, kernel_size=2, stride=2)  # type: ignore[index]
        return model, None
    raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHITECTURES)}")


def build_classifier(
    arch: str,
    num_classes: int,
    image_size: int | tuple[int, int] = 224,
    pretrained: str | Path | None = None,
    small_stem: bool | None = None,
) -> ImageClassifier:
    """Build ``arch`` for ``num_classes`` classes on images of ``image_size`` (int or (H, W)).

    ``small_stem=None`` enables the small-image stem when ``min(image_size) <= 112``. ``pretrained`` is a local
    weights file (never a download); see :func:`load_backbone_weights`.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    size = _image_size(image_size)
    if small_stem is None:
        small_stem = min(size) <= SMALL_STEM_MAX_SIDE
    backbone, resize = _build_backbone(arch, num_classes, small_stem)
    model = ImageClassifier(
        backbone, arch=arch, num_classes=num_classes, image_size=size, small_stem=small_stem, resize=resize
    )
    if pretrained is not None:
        model.reinitialized_keys = tuple(load_backbone_weights(model, pretrained))
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path), device="cpu")
    else:
        # weights_only: a weights file must never be able to run code when loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the weights one level down ({"state_dict": ..., "epoch": ...}).
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(state)  # type: ignore[arg-type]


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Accept torchvision-style keys, keys of a saved ImageClassifier ("backbone.") and DDP keys ("module.").
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: ImageClassifier, path: str | Path) -> list[str]:
    """Load a local weights file into ``model.backbone`` strictly; returns the head keys left re-initialised.

    Missing keys, unexpected keys and shape mismatches raise ``ValueError``, with two exceptions: the
    classification head is skipped (and kept at its fresh init) when its shape differs, and Inception's
    ``AuxLogits.*`` (unused: ``aux_logits=False``) are ignored.
    """
    path = Path(path)
    state = _strip_prefix(_read_state_dict(path))
    own = model.backbone.state_dict()
    head = _HEAD_PREFIX[model.arch]

    if model.arch == "inception_v3":
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}

    # Only a head present with another shape (another num_classes) is replaced; a file without a head is an error.
    reinit = [k for k in own if k.startswith(head) and k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if reinit:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        reinit = [k for k in own if k.startswith(head)]

    # Old checkpoints lack BatchNorm's num_batches_tracked; BatchNorm fills it in itself.
    missing = [k for k in own if k not in state and k not in reinit and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}")
        hint = (
            f" (the model uses the small-image stem, small_stem={model.small_stem}; weights trained with the other "
            "stem need the matching small_stem setting)"
            if mismatched
            else ""
        )
        raise ValueError(f"{path}: cannot load into {model.arch}: {'; '.join(parts)}{hint}")

    result = model.backbone.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if k not in reinit and not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise ValueError(f"{path}: missing {leftover}, unexpected {result.unexpected_keys}")
    if reinit:
        logger.warning(
            "%s: classifier head %s re-initialised for num_classes=%d (shape differs in %s)",
            model.arch,
            reinit,
            model.num_classes,
            path,
        )
    return reinit


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
