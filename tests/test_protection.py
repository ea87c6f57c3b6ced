"""Segue protects: the real `segue train` -> `segue protect` -> `segue evaluate` path on real faces at 32 px.

The default recipe (configs/train/default.yaml), then a ResNet-18 victim trained on the protected glint24 faces and
tested on clean ones, beside the same victim trained on the clean faces, and a control that must fail the same
assertion: the set protected by random noise at the same ε. This is the test that fails if the generator stops
protecting (a sign error in a step, a side-information path that no longer reaches the output, a distortion that
washes the pattern out).

Every subprocess runs torch's and oneDNN's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), which
every x86-64 CPU this project supports has, so an AVX-512 machine computes what an AVX2-only one does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from protection_testing import REPO, segue, victim_accuracies

# The bound, from the spread of the same recipe over seeds and CPUs (docs/protection_research.md, "Test bounds"):
# no-attack accuracy at most half the clean victim's and at most 5.5x chance (22.9% for 24 identities).
MAX_FRACTION_OF_CLEAN = 0.5
MAX_X_CHANCE = 5.5


def protects(acc: float, clean: float, chance: float) -> bool:
    """The assertion both the Segue set and the random-noise control are held to."""
    return acc <= MAX_FRACTION_OF_CLEAN * clean and acc <= MAX_X_CHANCE * chance


@pytest.mark.slow
@pytest.mark.realdata
def test_victim_trained_on_protected_glint24_fails_on_clean_faces(glint_shards: Path, tmp_path: Path) -> None:
    """Segue's no-attack victim stays under the bound, the random-noise control does not. Bound: the default recipe
    (grayscale twin) measured 13.8 / 9.2 / 12.1% over the bench's seeds 0-2 with AVX-512 kernels (clean 52.6% on
    average) and, in this test (seed 0) under the AVX2 kernels it forces, 16.25% against 51.25% clean (random noise
    54.58%), on a 2-core AMD EPYC; min(0.5 × clean, 5.5 × chance) = 22.9% puts the mean at 56% of the bound and this
    test's own digits 6.6 points under it, and the control fails it by about 30 points (docs/protection_research.md,
    "Test bounds")."""
    gen = tmp_path / "generator"
    # One process, batch 64, no loader worker, one thread; SEGUE_TEST_SEED picks another training and victim seed
    # (how the bound's spread was measured). DDP itself is tested in test_train.py.
    seed = os.environ.get("SEGUE_TEST_SEED", "0")
    segue(
        "train", "--config", str(REPO / "configs/train/default.yaml"), f"out={gen}",
        f"data.train={glint_shards / 'train'}", "data.image_size=[32]", "data.num_workers=0", "tensorboard=false",
        f"seed={seed}",
    )  # fmt: skip
    summary = json.loads((gen / "train_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["history"][-1]["f_ce_on_unlearnable"] < 1.0
    protected = tmp_path / "protected" / "train"
    segue("protect", "--generator", str(gen / "generator.safetensors"), "--in", str(glint_shards / "train"),
          "--out", str(protected))  # fmt: skip
    acc = victim_accuracies(protected, glint_shards / "train", glint_shards / "test", tmp_path, seed)
    chance, clean, protected_acc, control = acc["chance"], acc["clean"], acc["segue"], acc["random"]
    print(f"seed {seed}: segue {protected_acc:.2f}%, clean {clean:.2f}%, random noise {control:.2f}%")
    assert clean > 8 * chance, clean  # the victim does learn these faces
    assert protects(protected_acc, clean, chance), (protected_acc, clean, chance)
    assert not protects(control, clean, chance), (control, clean)  # random noise at the same ε does not protect
