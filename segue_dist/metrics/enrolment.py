"""Attackers that need no training from scratch: enrol photos with a pretrained face recogniser, identify new ones.

The attacker scrapes (possibly protected) photos with their names, embeds them with a pretrained model (e.g. dlib's
descriptor, `segue_dist.models.face_dlib`) and identifies each new clean photo:

* ``nearest_neighbour``: the identity of the most cosine-similar enrolled photo (1-NN; the face_recognition
  package's ``compare_faces`` does the same with a distance threshold);
* ``class_mean``: the identity whose mean enrolled embedding (re-normalised) is most cosine-similar;
* ``linear_probe``: a multinomial logistic regression fitted on the enrolled embeddings (scikit-learn).

Unlearnable examples poison what a network *learns* from the photos; an attacker who learns nothing (or only a
linear layer) on top of a recogniser trained elsewhere is outside that threat model, so these rows measure how much
of the pixel budget still moves a fixed embedding. Library code: arrays in, floats out, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ATTACKERS = ("nearest_neighbour", "class_mean", "linear_probe")


def _check(
    enrol: Any, enrol_labels: Any, probe: Any, probe_labels: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and finiteness; return float64 unit rows and int64 labels."""
    xe, xp = np.asarray(enrol, dtype=np.float64), np.asarray(probe, dtype=np.float64)
    ye, yp = np.asarray(enrol_labels), np.asarray(probe_labels)
    if xe.ndim != 2 or xp.ndim != 2:
        raise ValueError(f"embeddings must be (N, D) arrays, got enrol {xe.shape} and probe {xp.shape}")
    if xe.shape[1] != xp.shape[1]:
        raise ValueError(f"enrol and probe embeddings differ in dimension: {xe.shape[1]} vs {xp.shape[1]}")
    if len(xe) == 0 or len(xp) == 0:
        raise ValueError(f"need at least one enrolled and one probe embedding, got {len(xe)} and {len(xp)}")
    if ye.shape != (len(xe),) or yp.shape != (len(xp),):
        raise ValueError(
            f"labels must be 1-D, one per row: enrol {ye.shape} for {len(xe)}, probe {yp.shape} for {len(xp)}"
        )
    if not (np.isfinite(xe).all() and np.isfinite(xp).all()):
        raise ValueError("embeddings contain NaN or inf")
    return _unit(xe), ye, _unit(xp), yp


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbour_accuracy(enrol: Any, enrol_labels: Any, probe: Any, probe_labels: Any) -> float:
    """Top-1 accuracy of 1-NN by cosine similarity. enrol (N, D), probe (M, D), labels (N,) / (M,) of any hashable
    type; rows need not be normalised. Probe identities never enrolled count as errors. Raises ValueError on bad
    shapes, NaN/inf or empty inputs."""
    xe, ye, xp, yp = _check(enrol, enrol_labels, probe, probe_labels)
    nearest = np.argmax(xp @ xe.T, axis=1)  # ties: the first enrolled row, so results are deterministic
    return float(np.mean(ye[nearest] == yp))


def class_mean_accuracy(enrol: Any, enrol_labels: Any, probe: Any, probe_labels: Any) -> float:
    """Top-1 accuracy of the nearest class mean (cosine; means re-normalised). Same inputs and errors as
    :func:`nearest_neighbour_accuracy`."""
    xe, ye, xp, yp = _check(enrol, enrol_labels, probe, probe_labels)
    classes, index = np.unique(ye, return_inverse=True)
    means = np.zeros((len(classes), xe.shape[1]))
    np.add.at(means, index, xe)
    best = np.argmax(xp @ _unit(means).T, axis=1)
    return float(np.mean(classes[best] == yp))


def linear_probe_accuracy(
    enrol: Any, enrol_labels: Any, probe: Any, probe_labels: Any, *, c: float = 10.0, max_iter: int = 2000
) -> float:
    """Top-1 accuracy of a multinomial logistic regression (scikit-learn, L2 penalty, inverse strength ``c``; lbfgs,
    deterministic) fitted on the enrolled unit embeddings. Needs at least two enrolled identities; same errors as
    :func:`nearest_neighbour_accuracy`. Why c = 10: unit 128-d face embeddings have small coordinates (about 0.09),
    and scikit-learn's default c = 1 shrinks the probe far below 1-NN, where c = 10 reaches it (LFW-62 dlib
    embeddings: docs/measurements.md)."""
    from sklearn.linear_model import LogisticRegression

    xe, ye, xp, yp = _check(enrol, enrol_labels, probe, probe_labels)
    if len(np.unique(ye)) < 2:
        raise ValueError("the linear probe needs at least two enrolled identities")
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    probe_model = LogisticRegression(C=c, max_iter=max_iter).fit(xe, ye)
    return float(np.mean(probe_model.predict(xp) == yp))


def enrolment_report(enrol: Any, enrol_labels: Any, probe: Any, probe_labels: Any) -> dict[str, float | int]:
    """All three attackers plus chance (1 / enrolled identities) and the counts, as a JSON-ready dict."""
    identities = len(np.unique(np.asarray(enrol_labels)))
    report: dict[str, float | int] = {
        "nearest_neighbour": nearest_neighbour_accuracy(enrol, enrol_labels, probe, probe_labels),
        "class_mean": class_mean_accuracy(enrol, enrol_labels, probe, probe_labels),
    }
    if identities >= 2:
        report["linear_probe"] = linear_probe_accuracy(enrol, enrol_labels, probe, probe_labels)
    return {
        **report,
        "chance": 1.0 / identities,
        "enrolled": len(enrol),
        "probes": len(probe),
        "identities": identities,
    }
