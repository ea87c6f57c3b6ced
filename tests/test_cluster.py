"""`segue cluster` on real faces: extractor trained on LFW identities disjoint from the targets, features,
K-means, sidecar and quality; 2 gloo processes give the same labels as one; an interrupted run resumes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segue_dist.cluster import ExtractorTrainConfig, add_arguments, cluster, fit_extractor
from segue_dist.data.sidecar import read_sidecar
from segue_dist.models.face_dlib import INSTALL_HINT, dlib_available
from segue_dist.shards import ShardsConfig, build_shards

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.realdata, pytest.mark.slow]
# Pseudo-label quality bounds, from measured runs with a margin (see the tests); the old 0.08 / 0.11 accuracy bounds
# were within 1-3 points of what random labels reach, so a K-means that did not cluster could pass them.
LFW62_MIN_ACCURACY, LFW62_MIN_NMI = 0.12, 0.27
GLINT24_MIN_ACCURACY, GLINT24_MIN_NMI = 0.14, 0.12
DLIB_SUBSET_MIN_ACCURACY = 0.75  # the pretrained dlib descriptor on 8 LFW identities x 5 photos (see the test)


def build(src: Path, out: Path, **kw) -> Path:
    build_shards(ShardsConfig(src=str(src), out=str(out), size=[32], samples_per_shard=400, **kw), show_progress=False)
    return out / "train"


@pytest.fixture(scope="module")
def extractor(faces_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedding model trained on the LFW identities with 5-19 images: none of them is in LFW-62."""
    root = tmp_path_factory.mktemp("extractor")
    train = build(faces_root / "lfw423", root / "shards", min_per_identity=5, below_per_identity=20)
    cfg = ExtractorTrainConfig(
        shards=str(train), out=str(root / "model"), image_size=32, epochs=6, num_workers=1, small_stem=False
    )
    fit_extractor(cfg, show_progress=False)
    return root / "model"


def cluster_args(shards: Path, k: int, extractor: Path | str, out: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--shards", str(shards), "--k", str(k), "--extractor", str(extractor), "--out", str(out), "--workers", "1"]
    )


@pytest.fixture(scope="module")
def glint(faces_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(faces_root / "glint24", tmp_path_factory.mktemp("glint"))


def test_lfw62_every_sample_labelled_well_above_chance(faces_root: Path, extractor: Path, tmp_path: Path) -> None:
    """Bound: with this extractor, trained on the project's 2-core AMD EPYC (AVX-512 kernels; not measured under
    AVX2), accuracy 15.2% and NMI 0.331; random labels reach at most 6.8% / 0.168, and the bounds (0.12 / 0.27) sit
    about a fifth below the measurement, so another CPU's rounding of the extractor has room and a K-means that does
    not cluster does not."""
    train = build(faces_root / "lfw423", tmp_path / "lfw62", min_per_identity=20)
    summary = cluster(cluster_args(train, 62, extractor, tmp_path / "pseudo"))
    labels, k = read_sidecar(tmp_path / "pseudo" / "pseudo_labels.json")
    assert k == 62 and len(labels) == 3023 == summary["samples_labelled"]
    # Measured (this extractor, 2 CPU cores): accuracy 15.2%, NMI 0.331 (far from Segue's 80% condition, which needs
    # a real face model). Labels unrelated to the features (a K-means that does not cluster) score up to 6.8% / 0.168
    # here (Hungarian matching of 62 random clusters over 3,023 samples, max of 5 draws): the bounds sit ~20% below
    # the measured values and well above that.
    assert summary["quality"]["accuracy"] > LFW62_MIN_ACCURACY, summary["quality"]
    assert summary["quality"]["nmi"] > LFW62_MIN_NMI, summary["quality"]


def test_glint24_labels_resume_and_match_two_processes(glint: Path, extractor: Path, tmp_path: Path) -> None:
    """Bound: accuracy 17.2% and NMI 0.163 on the project's 2-core AMD EPYC (AVX-512 kernels; not measured under
    AVX2); random labels reach at most 8.5% / 0.042, and the bounds (0.14 / 0.12) sit between the two."""
    out = tmp_path / "one"
    summary = cluster(cluster_args(glint, 24, extractor, out))
    assert summary["samples_labelled"] == 2259 == len(read_sidecar(out / "pseudo_labels.json")[0])
    # Measured: accuracy 17.2%, NMI 0.163; random labels (24 clusters, 2,259 samples) score up to 8.5% / 0.042.
    assert summary["quality"]["accuracy"] > GLINT24_MIN_ACCURACY, summary["quality"]
    assert summary["quality"]["nmi"] > GLINT24_MIN_NMI, summary["quality"]
    reference = (out / "pseudo_labels.json").read_bytes()

    # An interrupted run: one shard's features never finished (no JSON marker). The rerun redoes just that one.
    (out / "features" / "00001.json").unlink()
    resumed = cluster(cluster_args(glint, 24, extractor, out))
    assert resumed["features"]["shards_done_before"] == len(list((out / "features").glob("*.json"))) - 1
    assert (out / "pseudo_labels.json").read_bytes() == reference

    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
        "-m", "segue_dist.cluster", "--shards", str(glint), "--k", "24", "--extractor", str(extractor),
        "--out", str(two), "--workers", "1", "--backend", "torch",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "cluster_summary.json").read_text())["world_size"] == 2
    # Same features, one process: K-means itself must not depend on how the rows were split across ranks.
    single = tmp_path / "single_torch"
    shutil.copytree(two / "features", single / "features")
    args = cluster_args(glint, 24, extractor, single)
    args.backend = "torch"
    cluster(args)
    assert read_sidecar(two / "pseudo_labels.json") == read_sidecar(single / "pseudo_labels.json")


@pytest.mark.skipif(not dlib_available(), reason=INSTALL_HINT)
def test_default_extractor_is_dlib_and_clusters_a_small_lfw_subset(faces_root: Path, tmp_path: Path) -> None:
    """Bound: 100% (40 of 40 faces detected) on the project's 2-core AMD EPYC with dlib's own kernels; random labels
    reach about 40% under Hungarian matching, so the 0.75 bound fails if the features stop carrying identity."""
    # A fixed subset as symlinks (nothing copied): the first 8 identities with >= 20 images, 5 photos each, kept at
    # their stored 250 px (dlib detects and aligns the face itself), 16 per shard so several shards are embedded.
    src = tmp_path / "src"
    folders = [d for d in sorted((faces_root / "lfw423").iterdir()) if len(list(d.iterdir())) >= 20][:8]
    for folder in folders:
        (src / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:5]:
            (src / folder.name / photo.name).symlink_to(photo)
    shards = tmp_path / "shards"
    build_shards(ShardsConfig(src=str(src), out=str(shards), samples_per_shard=16), show_progress=False)
    summary = cluster(cluster_args(shards / "train", 8, "", tmp_path / "pseudo"))  # no --extractor: dlib
    features = summary["features"]
    assert summary["samples_labelled"] == 40 == features["faces_detected"] + features["no_face_fallback"]
    # Measured: 100% (40 of 40 faces detected). Random labels (8 clusters, 40 samples) reach about 40% under
    # Hungarian matching, so the bound also fails if the features stop carrying identity.
    assert summary["quality"]["accuracy"] > DLIB_SUBSET_MIN_ACCURACY, summary["quality"]

    # Two processes (one per core, the way to use more cores: dlib runs one image at a time): each rank embeds its
    # own shards and the summary counts every rank's faces, not just rank 0's.
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29614",
        "-m", "segue_dist.cluster", "--shards", str(shards / "train"), "--k", "8", "--out", str(two),
        "--workers", "1", "--backend", "torch",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary2 = json.loads((two / "cluster_summary.json").read_text())
    assert summary2["world_size"] == 2 and summary2["features"]["samples"] == 40, summary2["features"]
    assert summary2["quality"]["accuracy"] > DLIB_SUBSET_MIN_ACCURACY, summary2["quality"]
