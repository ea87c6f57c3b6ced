"""The synthetic demo corpus: deterministic, the requested counts and sizes, identities a classifier can tell apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segue_dist.data.synthetic import generate_corpus, identity_look, identity_name


def corpus_arrays(
    identities: int, per_identity: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels, index = [], [], []
    for name, i, img in generate_corpus(identities, per_identity, size, seed):
        assert img.mode == "RGB" and img.size == (size, size)
        images.append(np.asarray(img))
        labels.append(int(name.rsplit(" ", 1)[1]))
        index.append(i)
    return np.stack(images), np.array(labels), np.array(index)


def test_counts_sizes_and_names() -> None:
    images, labels, index = corpus_arrays(3, 5, 40, seed=0)
    assert images.shape == (15, 40, 40, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [5, 5, 5]
    assert sorted(index.tolist()) == sorted(list(range(5)) * 3)
    names = [name for name, _, _ in generate_corpus(12, 1, 32, seed=0)]
    assert names == [identity_name(i) for i in range(12)] and len(set(names)) == 12
    assert 0 < images.mean() < 255 and images.std() > 10  # not blank


def test_deterministic_for_a_seed() -> None:
    a, _, _ = corpus_arrays(2, 3, 32, seed=7)
    b, _, _ = corpus_arrays(2, 3, 32, seed=7)
    c, _, _ = corpus_arrays(2, 3, 32, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert identity_look(1, seed=7) == identity_look(1, seed=7) != identity_look(1, seed=8)
    # Shots of one identity differ (pose, light, noise): the corpus is not one image repeated.
    assert not np.array_equal(a[0], a[1])
    # An identity looks the same whatever else is generated alongside it.
    d, _, _ = corpus_arrays(4, 3, 32, seed=7)
    assert np.array_equal(a, d[:6])


def test_identities_are_distinguishable() -> None:
    """Nearest class centroid on 16x16 pixels, held-out shots: far above the 10% chance of 10 identities."""
    images, labels, index = corpus_arrays(10, 12, 32, seed=0)
    small = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.Resampling.BILINEAR)) for im in images])
    x = small.reshape(len(small), -1).astype(np.float32) / 255.0
    train, test = index < 8, index >= 8

    def held_out_accuracy(y: np.ndarray) -> float:
        centroids = np.stack([x[train & (y == c)].mean(0) for c in range(10)])
        pred = ((x[test][:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        return float((pred == y[test]).mean())

    accuracy = held_out_accuracy(labels)
    assert accuracy >= 0.5, accuracy
    # Control: with the identities shuffled across images the same classifier is near chance, so the accuracy
    # above comes from identity, not from something every image shares.
    shuffled = np.random.default_rng(0).permutation(labels)
    assert held_out_accuracy(shuffled) <= 0.3


def test_demo_corpus_builds_into_shards(tmp_path: Path) -> None:
    from segue_dist.demo import write_demo_corpus
    from segue_dist.shards import ShardsConfig, build_shards

    n = write_demo_corpus(tmp_path / "corpus", identities=4, per_identity=6, size=32, seed=0)
    assert n == 24 and len(list((tmp_path / "corpus").rglob("*.jpg"))) == 24
    summary = build_shards(
        ShardsConfig(src=str(tmp_path / "corpus"), out=str(tmp_path / "shards"), test_per_identity=2, workers=1),
        show_progress=False,
    )
    assert summary["identities"] == 4 and summary["samples"] == 24 and summary["skipped"] == 0
    assert summary["splits"]["test"]["samples"] == 8
