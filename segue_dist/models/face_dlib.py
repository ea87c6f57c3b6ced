"""dlib's ResNet face descriptor: detect (HOG), align (5 landmarks, 150x150 chip), embed (128-d, L2-normalised).

The model is the one behind the ``face_recognition`` package (A. Geitgey) and dlib's ``dnn_face_recognition_ex``
example (D. King): a ResNet-29 trained with a metric loss on about 3 million faces (its published LFW pair score:
docs/measurements.md). Its weights ship in the ``face-recognition-models`` package and dlib itself in ``dlib-bin`` (the
``[faces]`` extra), so nothing is downloaded at run time.

Pipeline per image, as in ``face_recognition.face_encodings``:

1. ``dlib.get_frontal_face_detector`` (HOG + linear SVM). Its window is 80 px, so small images are upsampled
   first (``upsample``); the largest detection is kept.
2. No detection: the corpora this project protects are already aligned crops (deep-funneled LFW, ArcFace-aligned
   Glint), so the face sits in the centre. The box becomes the centred square whose side is the median
   side/image ratio of the faces found in the same batch (``fallback_fraction`` when none was found), and the
   sample is counted as a fallback.
3. ``shape_predictor_5_face_landmarks`` on the box, ``dlib.get_face_chip`` to a 150x150 chip (padding 0.25).
4. ``face_recognition_model_v1.compute_face_descriptor`` -> 128 floats, L2-normalised here (dlib's own vectors have
   norms near 1.4; identity is in the direction, and spherical K-means and cosine kNN expect unit rows).

Library code: arrays in, arrays out; the only files read are the installed model weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

EMBED_DIM = 128
CHIP_SIZE = 150  # the descriptor's input size (dlib's dnn_face_recognition_ex)
CHIP_PADDING = 0.25  # face_recognition's default margin around the landmarks
HOG_WINDOW = 80  # the frontal detector's window side in px: smaller faces are never found without upsampling
INSTALL_HINT = (
    "the dlib face model needs the [faces] extra: pip install 'segue-dist[faces]' (dlib-bin, face-recognition-models)"
)
MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}


class FaceModelUnavailable(ImportError):
    """dlib or the face-recognition-models weights are not installed (message: how to install them)."""


def dlib_available() -> bool:
    """True when both dlib and the face-recognition-models weights are importable (nothing is loaded)."""
    return importlib.util.find_spec("dlib") is not None and _models_dir() is not None


def _models_dir() -> Path | None:
    # find_spec does not run face_recognition_models/__init__.py, which imports pkg_resources: gone from
    # setuptools >= 81, so importing the package fails on a current environment although the weights are there.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder if all((folder / name).is_file() for name in MODEL_FILES.values()) else None


def model_paths() -> dict[str, Path]:
    """Paths of the landmark and descriptor weights; FaceModelUnavailable when not installed."""
    folder = _models_dir()
    if folder is None or importlib.util.find_spec("dlib") is None:
        raise FaceModelUnavailable(INSTALL_HINT)
    return {role: folder / name for role, name in MODEL_FILES.items()}


def weights_sha256() -> str:
    """One SHA-256 over both weight files (landmarks, then descriptor): names the features in sidecars."""
    digest = hashlib.sha256()
    for path in model_paths().values():
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class DlibConfig:
    """``upsample``: HOG pyramid upsamplings, -1 = enough for the short side to reach ``min_side`` px (at most 2).
    ``fallback_fraction``: side of the centred fallback box / short side, used when no face in the batch was found
    (0.45 = dlib's median box on 250 px deep-funneled LFW). ``num_jitters``: dlib's test-time augmentation (each
    jitter costs one more network pass; 0 = one pass, as face_recognition does by default)."""

    upsample: int = -1
    min_side: int = 2 * HOG_WINDOW
    fallback_fraction: float = 0.45
    num_jitters: int = 0

    def __post_init__(self) -> None:
        if not -1 <= self.upsample <= 3:
            raise ValueError(f"upsample must be -1 (auto) or 0..3, got {self.upsample}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if not 0.1 <= self.fallback_fraction <= 1.0:
            raise ValueError(f"fallback_fraction must be in [0.1, 1], got {self.fallback_fraction}")
        if self.num_jitters < 0:
            raise ValueError(f"num_jitters must be >= 0, got {self.num_jitters}")


@dataclass
class FaceEmbeddings:
    """``embeddings`` float32 (N, 128), unit rows; ``detected`` bool (N,): False = centre-crop fallback."""

    embeddings: np.ndarray
    detected: np.ndarray

    @property
    def fallbacks(self) -> int:
        return int((~self.detected).sum())


class DlibFaceModel:
    """dlib HOG detector + 5-point alignment + ResNet descriptor. Loads the weights once (loading costs far more than one
    image)."""

    def __init__(self, config: DlibConfig | None = None) -> None:
        self.config = config or DlibConfig()
        paths = model_paths()
        import dlib

        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(paths["landmarks"]))
        self._descriptor = dlib.face_recognition_model_v1(str(paths["descriptor"]))

    def embed(self, images: list[np.ndarray] | np.ndarray) -> FaceEmbeddings:
        """Embed RGB uint8 images, each (H, W, 3) (sizes may differ), or one (N, H, W, 3) array.

        Raises ValueError for anything else (wrong dtype, rank or channel count). An empty batch gives (0, 128).
        """
        batch = [_check_image(img, i) for i, img in enumerate(images)]
        boxes = [self._detect(img) for img in batch]
        fraction = _typical_fraction(batch, boxes, self.config.fallback_fraction)
        detected = np.array([box is not None for box in boxes], dtype=bool)
        rows = [
            self._describe(img, box or self._centre_box(img, fraction)) for img, box in zip(batch, boxes, strict=True)
        ]
        emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, EMBED_DIM), np.float32)
        return FaceEmbeddings(_l2_normalise(emb), detected)

    def _upsample(self, image: np.ndarray) -> int:
        if self.config.upsample >= 0:
            return self.config.upsample
        short = min(image.shape[:2])
        return min(2, max(0, math.ceil(math.log2(self.config.min_side / short)))) if short else 0

    def _detect(self, image: np.ndarray) -> Any:
        found = self._detector(image, self._upsample(image))
        return max(found, key=lambda r: r.area()) if len(found) else None

    def _centre_box(self, image: np.ndarray, fraction: float) -> Any:
        h, w = image.shape[:2]
        side = max(1, round(fraction * min(h, w)))
        left, top = (w - side) // 2, (h - side) // 2
        return self._dlib.rectangle(left, top, left + side - 1, top + side - 1)

    def _describe(self, image: np.ndarray, box: Any) -> np.ndarray:
        shape = self._landmarks(image, box)
        chip = self._dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        return np.asarray(self._descriptor.compute_face_descriptor(chip, self.config.num_jitters), dtype=np.float32)


def _check_image(image: Any, index: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"image {index}: expected an RGB uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)  # dlib reads the buffer directly: a strided view would be rejected


def _typical_fraction(images: list[np.ndarray], boxes: list[Any], default: float) -> float:
    """Median detected side / short side in this batch: one corpus is aligned the same way throughout."""
    ratios = [box.width() / min(img.shape[:2]) for img, box in zip(images, boxes, strict=True) if box is not None]
    return float(np.clip(np.median(ratios), 0.1, 1.0)) if ratios else default


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class DlibFeatures(nn.Module):
    """The cluster stage's extractor interface: [0, 1] float images (B, 3, H, W) -> unit embeddings (B, 128).

    No parameters and no gradient (dlib runs on the CPU whatever the device); keeps running totals of detected
    faces and centre-crop fallbacks (``counts``) for the stage's summary.
    """

    def __init__(self, config: DlibConfig | None = None) -> None:
        super().__init__()
        self.model = DlibFaceModel(config)
        self.counts = {"faces_detected": 0, "no_face_fallback": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
        # Back to the uint8 pixels the loader decoded (x = uint8 / 255 exactly, so rounding restores them).
        pixels = x.detach().float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        out = self.model.embed(pixels.numpy())
        self.counts["faces_detected"] += int(out.detected.sum())
        self.counts["no_face_fallback"] += out.fallbacks
        return torch.from_numpy(out.embeddings).to(x.device)
