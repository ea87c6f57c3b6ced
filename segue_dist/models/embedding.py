"""Face embedding model for pseudo-labels: a classifier backbone with an L2-normalised embedding head.

Trained with a CosFace-style margin head (normalised weights, additive cosine margin) so identities form tight
angular clusters, which is what spherical K-means then recovers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segue_dist.models.classifiers import ARCHITECTURES, build_classifier


@dataclass
class EmbedderConfig:
    arch: str = "resnet18"
    embed_dim: int = 128
    image_size: int = 64
    small_stem: bool | None = None  # None = the classifier factory's choice (on at <= 112 px)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.embed_dim < 2:
            raise ValueError(f"embed_dim must be >= 2, got {self.embed_dim}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")


class FaceEmbedder(nn.Module):
    """[0, 1] images -> unit-norm embeddings (B, embed_dim)."""

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_classifier(
            config.arch, config.embed_dim, image_size=config.image_size, small_stem=config.small_stem
        )
        self.bn = nn.BatchNorm1d(config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.backbone(x).float()), dim=1)


class CosineMarginHead(nn.Module):
    """CosFace: logits s·(cos θ − m·[target]) over normalised class weights."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.25) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = embeddings @ F.normalize(self.weight, dim=1).t()
        if labels is not None:
            cosine = cosine - self.margin * F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        return self.scale * cosine
