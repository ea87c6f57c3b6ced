"""Models: the Segue perturbation generator, the surrogate/victim classifier factory and the pretrained dlib face
descriptor (no I/O except reading local weights: ``build_classifier(pretrained=...)``, third-party backbones, and
the weights installed by the [faces] extra)."""

from segue_dist.models.classifiers import (
    ARCHITECTURES,
    ImageClassifier,
    Normalize,
    build_classifier,
    count_parameters,
    load_backbone_weights,
)
from segue_dist.models.face_dlib import (
    DlibConfig,
    DlibFaceModel,
    DlibFeatures,
    FaceEmbeddings,
    FaceModelUnavailable,
    dlib_available,
)
from segue_dist.models.generator import GeneratorConfig, SegueGenerator, label_bits

__all__ = [
    "ARCHITECTURES",
    "DlibConfig",
    "DlibFaceModel",
    "DlibFeatures",
    "FaceEmbeddings",
    "FaceModelUnavailable",
    "GeneratorConfig",
    "ImageClassifier",
    "Normalize",
    "SegueGenerator",
    "build_classifier",
    "count_parameters",
    "dlib_available",
    "label_bits",
    "load_backbone_weights",
]
