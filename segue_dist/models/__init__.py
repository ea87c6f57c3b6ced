"""Models: the Segue perturbation generator and the surrogate/victim classifier factory (no I/O except reading a
local weights file when ``build_classifier(pretrained=...)`` is asked to)."""

from segue_dist.models.classifiers import (
    ARCHITECTURES,
    ImageClassifier,
    Normalize,
    build_classifier,
    count_parameters,
    load_backbone_weights,
)
from segue_dist.models.generator import GeneratorConfig, SegueGenerator, label_bits

__all__ = [
    "ARCHITECTURES",
    "GeneratorConfig",
    "ImageClassifier",
    "Normalize",
    "SegueGenerator",
    "build_classifier",
    "count_parameters",
    "label_bits",
    "load_backbone_weights",
]
