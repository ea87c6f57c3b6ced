"""Third-party feature backbones for `segue cluster --extractor-arch torchvision:<name>|timm:<name>`: a local
checkpoint (safetensors, or a weights-only torch file) loaded strictly, its classifier head removed.

Reads only the weights file it is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from segue_dist.config import ConfigError
from segue_dist.models.classifiers import Normalize


class TorchvisionFeatures(nn.Module):
    """Penultimate features of a local torchvision/timm checkpoint, L2-normalised; input [0, 1] images."""

    def __init__(self, backbone: nn.Module, image_size: int) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.backbone = backbone
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return F.normalize(self.backbone(self.normalize(x)).flatten(1).float(), dim=1)


def third_party_backbone(arch: str, weights: Path) -> nn.Module:
    family, _, name = arch.partition(":")
    if weights.suffix == ".safetensors":
        state = load_file(str(weights))
    else:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if family == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        model.load_state_dict(state, strict=True)
        for head in ("fc", "classifier", "head", "heads"):
            if hasattr(model, head):
                setattr(model, head, nn.Identity())
                break
        return model
    if family == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError("extractor arch timm:* needs the timm package (pip install timm)") from None
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(state, strict=True)
        model.reset_classifier(0)
        return model
    raise ConfigError(f"--extractor-arch must be torchvision:<name> or timm:<name>, got {arch!r}")
