"""dlib face descriptor (`segue_dist.models.face_dlib`): output contract, determinism, the missing-package message,
and on a small fixed LFW sample: identity structure, clustering and the 1-NN enrolment attacker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segue_dist.config import ConfigError
from segue_dist.kmeans import KMeansConfig, fit_kmeans
from segue_dist.metrics.clustering import cluster_accuracy
from segue_dist.metrics.enrolment import nearest_neighbour_accuracy
from segue_dist.models import face_dlib
from segue_dist.models.face_dlib import EMBED_DIM, DlibConfig, DlibFaceModel, DlibFeatures, dlib_available

needs_dlib = pytest.mark.skipif(not dlib_available(), reason=face_dlib.INSTALL_HINT)
# The fixed LFW sample: the first IDENTITIES names (sorted) with >= 20 images, their first PER_IDENTITY files.
IDENTITIES, PER_IDENTITY = 8, 4


@pytest.fixture(scope="module")
def model() -> DlibFaceModel:
    return DlibFaceModel()


def noise(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


@needs_dlib
def test_output_is_unit_float32_rows_for_mixed_sizes(model: DlibFaceModel) -> None:
    out = model.embed([noise((64, 64), 0), noise((120, 90), 1), noise((250, 250), 2)])
    assert out.embeddings.shape == (3, EMBED_DIM) and out.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
    assert out.detected.dtype == bool and out.detected.shape == (3,)
    assert out.fallbacks == 3  # noise holds no face: every row comes from the centre-crop fallback


@needs_dlib
def test_same_image_twice_gives_the_same_embedding(model: DlibFaceModel) -> None:
    image = noise((96, 96), 3)
    first, second = model.embed([image, image.copy()]).embeddings
    assert np.array_equal(first, second)
    assert np.array_equal(model.embed(image[None]).embeddings[0], first)  # batch composition does not matter here


@needs_dlib
def test_empty_batch_and_bad_input(model: DlibFaceModel) -> None:
    assert model.embed([]).embeddings.shape == (0, EMBED_DIM)
    with pytest.raises(ValueError, match="image 0: expected an RGB uint8"):
        model.embed([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="image 1: expected an RGB uint8"):
        model.embed([noise((32, 32), 4), np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="fallback_fraction"):
        DlibConfig(fallback_fraction=0.0)


@needs_dlib
def test_torch_wrapper_matches_the_array_api_and_counts_fallbacks(model: DlibFaceModel) -> None:
    images = np.stack([noise((48, 48), 5), noise((48, 48), 6)])
    features = DlibFeatures()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # what the cluster stage feeds
    emb = features(x)
    assert emb.dtype == torch.float32 and emb.shape == (2, EMBED_DIM)
    np.testing.assert_array_equal(emb.numpy(), model.embed(images).embeddings)
    assert features.counts == {"faces_detected": 0, "no_face_fallback": 2}


def test_missing_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def hide(name: str, *args):
        return None if name in ("dlib", "face_recognition_models") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    assert not dlib_available()
    with pytest.raises(face_dlib.FaceModelUnavailable, match=r"pip install 'segue-dist\[faces\]'"):
        DlibFaceModel()
    from segue_dist.cluster import load_feature_model

    with pytest.raises(ConfigError, match=r"segue-dist\[faces\]"):
        load_feature_model("dlib")


# ------------------------------------------------------------------------------------------------- real faces


@pytest.fixture(scope="module")
def lfw_sample(faces_root: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """IDENTITIES x PER_IDENTITY deep-funneled LFW photos (250 px) and their identity indices."""
    root = faces_root / "lfw423"
    names = [d for d in sorted(root.iterdir()) if d.is_dir() and len(list(d.iterdir())) >= 20][:IDENTITIES]
    images, labels = [], []
    for index, folder in enumerate(names):
        for path in sorted(folder.iterdir())[:PER_IDENTITY]:
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(index)
    return images, np.asarray(labels)


@pytest.fixture(scope="module")
def lfw_embedded(model: DlibFaceModel, lfw_sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = lfw_sample
    out = model.embed(images)
    return out.embeddings, labels, out.detected


@needs_dlib
@pytest.mark.realdata
def test_lfw_faces_are_found_and_same_identity_is_closer(lfw_embedded) -> None:
    """Bound: 100% of the 2,688 triplets and 32 of 32 faces detected on the project's 2-core AMD EPYC (dlib's own
    kernels); a descriptor without identity structure scores about 50%, so the 0.9 bound has room for a few hard
    pairs and none for a broken model."""
    emb, labels, detected = lfw_embedded
    assert detected.mean() >= 0.9, f"only {detected.sum()} of {len(detected)} LFW faces detected"
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    # Every (anchor, positive, negative) triplet: is the positive more similar to the anchor than the negative?
    wins, total = 0, 0
    for a in range(len(emb)):
        pos = sim[a][same[a] & (np.arange(len(emb)) != a)]
        neg = sim[a][~same[a]]
        wins += int((pos[:, None] > neg[None, :]).sum())
        total += pos.size * neg.size
    # Measured: 100% of the 2,688 triplets (32 of 32 faces detected). Without identity structure: about 50%.
    assert wins / total > 0.9, wins / total


@needs_dlib
@pytest.mark.realdata
def test_lfw_sample_clusters_and_one_nn_identifies(lfw_embedded) -> None:
    """Bound: K-means measured 84-100% over its seeds 0-4 and 1-NN 100% (chance 12.5%) on the project's 2-core AMD
    EPYC; random labels reach up to 44% under Hungarian matching, so 0.75 sits below the worst seed and far above
    random."""
    emb, labels, _ = lfw_embedded
    predicted = fit_kmeans(emb, KMeansConfig(k=IDENTITIES, seed=0)).labels
    # Measured: 84-100% over K-means seeds 0-4 (84% with seed 0: two identities swap a photo). Random labels on
    # 32 points / 8 clusters score up to 44% under Hungarian matching (max of 20 draws).
    assert cluster_accuracy(labels, predicted) > 0.75
    # Enrol the first three photos of each identity, identify the fourth (chance 1/8 = 12.5%).
    probe = np.arange(len(labels)) % PER_IDENTITY == PER_IDENTITY - 1
    accuracy = nearest_neighbour_accuracy(emb[~probe], labels[~probe], emb[probe], labels[probe])
    assert accuracy >= 0.75, accuracy  # measured 100%


@needs_dlib
@pytest.mark.realdata
def test_small_shards_still_find_the_face(model: DlibFaceModel, lfw_sample, lfw_embedded) -> None:
    # The training shards are 64 px: the detector (80 px window) only finds faces there because small images are
    # upsampled, and the 64 px embedding must still point at the same identity as the 250 px one.
    images, labels = lfw_sample
    small = [np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC)) for img in images]
    out = model.embed(small)
    full = lfw_embedded[0]
    assert out.detected.mean() >= 0.8, out.detected  # measured: 32 of 32 (cosine to the 250 px row 0.94-0.99)
    best = np.argmax(out.embeddings @ full.T, axis=1)
    assert np.mean(labels[best] == labels) >= 0.75
