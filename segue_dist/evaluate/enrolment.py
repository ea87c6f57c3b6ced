"""The pretrained-recogniser attacker as a sweep row (victim ``dlib_enrolment``): enrol a method's training set with
dlib's face descriptor, identify the clean test set by nearest enrolled neighbour, class-mean cosine and a
logistic-regression probe (:mod:`segue_dist.metrics.enrolment`). Nothing is trained from scratch, so the attacker's
transforms do not apply: one row per method, tagged with the group ``enrolment``."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from segue_dist.attacks import AttackerConfig
from segue_dist.config import ConfigError
from segue_dist.evaluate.config import ENROLMENT_GROUP
from segue_dist.evaluate.data import check_label_maps, load_image_set
from segue_dist.metrics.enrolment import enrolment_report

EXTRACTOR = "dlib (face-recognition-models 0.3.0)"
EMBED_BATCH = 256  # the centre-crop fallback box is sized per batch (median detected face)


@dataclass
class EmbeddedSplit:
    embeddings: np.ndarray  # (N, 128) unit rows
    labels: np.ndarray  # (N,) int64
    label_map: dict[str, int]
    counts: dict[str, int]


def require_face_model() -> None:
    """A one-line ConfigError naming the ``[faces]`` extra when dlib or its weights are not installed."""
    from segue_dist.models.face_dlib import INSTALL_HINT, dlib_available

    if not dlib_available():
        raise ConfigError(f"victim dlib_enrolment: {INSTALL_HINT}")


@dataclass
class EmbeddingCache:
    """One dlib model and the splits embedded with it in this process (the clean test set is shared by every row)."""

    splits: dict[tuple[str, int], EmbeddedSplit] = field(default_factory=dict)
    _model: Any = None

    def model(self) -> Any:
        if self._model is None:
            from segue_dist.models.face_dlib import DlibFaceModel

            self._model = DlibFaceModel()
        return self._model

    def embed(self, path: str, size: int) -> EmbeddedSplit:
        if (path, size) not in self.splits:
            self.splits[(path, size)] = embed_split(self.model(), path, size)
        return self.splits[(path, size)]


def embed_split(model: Any, path: str, size: int) -> EmbeddedSplit:
    """Every decodable sample of a split (at ``size`` px, 0 = as stored) through the dlib model, in batches."""
    data = load_image_set(path, size)
    pixels = data.images.permute(0, 2, 3, 1).contiguous().numpy()
    parts = [model.embed(pixels[i : i + EMBED_BATCH]) for i in range(0, len(pixels), EMBED_BATCH)]
    detected = np.concatenate([p.detected for p in parts])
    counts = {
        "samples": len(detected),
        "skipped": len(data.skipped),
        "faces_detected": int(detected.sum()),
        "no_face_fallback": int((~detected).sum()),
    }
    embeddings = np.concatenate([p.embeddings for p in parts])
    return EmbeddedSplit(embeddings, data.labels.numpy(), dict(data.label_map), counts)


def run_enrolment(
    *,
    victim: str,
    train_dir: str,
    test_dir: str,
    size: int,
    attack: AttackerConfig,
    tags: dict[str, Any],
    cache: EmbeddingCache,
) -> dict[str, Any]:
    """One enrolment row as a result record shaped like a victim's (``final_acc`` = 1-NN top-1 %, with chance)."""
    from segue_dist.evaluate.victim import row_name

    start = time.perf_counter()
    enrol, probe = cache.embed(train_dir, size), cache.embed(test_dir, size)
    check_label_maps(enrol.label_map, probe.label_map, train_dir)
    scores = enrolment_report(enrol.embeddings, enrol.labels, probe.embeddings, probe.labels)
    chance = 100.0 * float(scores["chance"])
    final = 100.0 * float(scores["nearest_neighbour"])
    attackers = ("nearest_neighbour", "class_mean", "linear_probe")
    return {
        "kind": "victim",
        "name": row_name(tags.get("method", "protected"), victim, attack.name),
        "tags": {
            **tags,
            "victim": victim,
            "attack": attack.name,
            "group": ENROLMENT_GROUP,
            "attack_config": asdict(attack),
        },
        "data": {"train": train_dir, "test": test_dir, "size": size, "enrol": enrol.counts, "probe": probe.counts},
        "config": {"size": size, "extractor": EXTRACTOR},
        "num_classes": int(scores["identities"]),
        "chance": chance,
        "final_acc": final,
        "x_chance": final / chance,
        "enrolment": {name: 100.0 * float(scores[name]) for name in attackers if name in scores},
        "wall_s": round(time.perf_counter() - start, 2),
        "device": "cpu",
        "env": {"python": platform.python_version()},
    }
