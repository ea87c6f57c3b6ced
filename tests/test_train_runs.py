"""Whole `segue train` runs on a tiny synthetic shard set (no real data): training on pseudo-labels, exact resume from
a mid-epoch checkpoint, the history's keys and stop rule, and a 2-process launch refusing a 1-process checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from train_testing import IDENTITIES, TINY, build_tiny_shards, run_train

import segue_dist.train as train_module
from segue_dist.train import TrainConfig
from segue_dist.training.run_state import StopReason, stop_after
from segue_dist.weights import label_map_hash, load_generator, load_state

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("tiny"))


def generator_state(out: Path) -> dict[str, torch.Tensor]:
    generator, _ = load_generator(out / "generator.safetensors")
    return generator.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The uninterrupted run on the shards' own labels."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_train(out, tiny_shards)


def sample_labels(shards: Path) -> dict[str, int]:
    """key -> the `.cls` label of every training sample."""
    from segue_dist.data.loader import iter_tar_samples

    return {
        sample["__key__"]: int(sample["cls"])
        for tar in sorted(shards.glob("*.tar"))
        for sample in iter_tar_samples(str(tar))
    }


def write_sidecar(path: Path, labels: dict[str, int], k: int) -> Path:
    path.write_text(json.dumps({"k": k, "labels": labels}))
    return path


# ------------------------------------------------------------------------------------------------ pseudo-labels


def test_pseudo_labels_equal_to_the_true_ones_train_the_same_generator(
    reference: tuple[Path, dict[str, Any]], tiny_shards: Path, tmp_path: Path
) -> None:
    ref_out, _ = reference
    labels = sample_labels(tiny_shards)
    assert len(labels) == IDENTITIES * 12
    sidecar = write_sidecar(tmp_path / "pseudo.json", labels, IDENTITIES)
    run_train(tmp_path / "run", tiny_shards, f"data.labels={sidecar}")
    # The sidecar path feeds the same ŷ as `.cls` does, in the same order: the same weights, bit for bit.
    assert_same_weights(generator_state(tmp_path / "run"), generator_state(ref_out))
    meta = json.loads((tmp_path / "run" / "generator.json").read_text())
    assert meta["label_source"] == f"pseudo:{sidecar}"
    assert meta["pseudo_labels_sha256"] == label_map_hash(labels)


def test_training_uses_the_sidecars_k_and_labels(tiny_shards: Path, tmp_path: Path) -> None:
    # Two pseudo-classes that cut across the 4 identities: G and f must be built for K = 2 and trained on them.
    labels = {key: cls % 2 for key, cls in sample_labels(tiny_shards).items()}
    sidecar = write_sidecar(tmp_path / "pseudo.json", labels, 2)
    summary = run_train(tmp_path / "run", tiny_shards, f"data.labels={sidecar}", "epochs=1")
    generator, meta = load_generator(tmp_path / "run" / "generator.safetensors")
    assert meta["num_classes"] == 2 and generator.config.num_classes == 2
    assert summary["history"][0]["skipped_samples"] == 0  # every key of the shards found its pseudo-label
    tensors, _ = load_state(tmp_path / "run" / "checkpoints" / "last")
    assert tensors["f.model.backbone.fc.weight"].shape == (2, 512)  # f classifies the 2 pseudo-classes


# ------------------------------------------------------------------------------------------- resume mid-epoch


class Crash(Exception):
    """Stands for a kill -9 between two steps."""


def test_resume_from_a_mid_epoch_checkpoint_is_bit_identical(
    reference: tuple[Path, dict[str, Any]], tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref_out, ref = reference
    real_step, calls = train_module.take_step, []

    def crash_at_step_9(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 9:
            raise Crash
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "take_step", crash_at_step_9)
    with pytest.raises(Crash):
        run_train(tmp_path, tiny_shards)
    monkeypatch.undo()
    # The last checkpoint is mid-epoch: epoch 2 (steps 7-12), after its 2nd batch.
    position = json.loads((tmp_path / "checkpoints" / "last.json").read_text())["position"]
    assert position == {"epoch": 2, "batch": 2, "step": 8}
    resumed = run_train(tmp_path, tiny_shards)
    assert resumed["steps"] == ref["steps"] == 12
    assert [h["epoch"] for h in resumed["history"]] == [2]
    # Same data position, weights, optimiser moments and RNG streams: the same generator, bit for bit.
    assert_same_weights(generator_state(tmp_path), generator_state(ref_out))


# ------------------------------------------------------------------------------------------ history and stopping


def test_history_names_f_loss_and_g_objective_apart(tiny_shards: Path, tmp_path: Path) -> None:
    summary = run_train(tmp_path, tiny_shards, "schedule=alternate", "f_every=2", "epochs=2", "optim.beta=0.5")
    f_epoch, g_epoch = summary["history"]
    assert (f_epoch["stage"], g_epoch["stage"]) == ("f", "g")
    # f epoch: f's training loss, nothing of G's.
    assert f_epoch["f_ce_on_unlearnable"] == f_epoch["loss"] > 0
    assert f_epoch["g_objective"] is None and f_epoch["g_ce"] is None and f_epoch["delta_l2"] is None
    # G epoch: f is frozen, so no f loss; G's objective is its CE term plus β·E‖δ‖₂ (β = 0.5 makes the gap visible).
    assert g_epoch["f_ce_on_unlearnable"] is None
    assert g_epoch["g_objective"] == g_epoch["loss"]
    assert g_epoch["g_objective"] == pytest.approx(g_epoch["g_ce"] + 0.5 * g_epoch["delta_l2"], rel=1e-6)
    assert g_epoch["delta_l2"] > 0


def test_stop_loss_tests_fs_loss_on_unlearnable_examples_only() -> None:
    cfg = TrainConfig(stop_loss=1e-3, epochs=10)
    g_epoch = {"stage": "g", "f_ce_on_unlearnable": None, "g_objective": 1e-5, "g_ce": 1e-5, "delta_l2": 0.0}
    assert stop_after(g_epoch, cfg, epoch=2, epochs_this_run=2) is None  # G's own CE is not f's loss
    f_epoch = {"stage": "f", "f_ce_on_unlearnable": 5e-4, "g_objective": None, "g_ce": None, "delta_l2": None}
    assert stop_after(f_epoch, cfg, epoch=6, epochs_this_run=6) is StopReason.STOP_LOSS
    assert stop_after({**f_epoch, "f_ce_on_unlearnable": 2e-3}, cfg, epoch=6, epochs_this_run=6) is None
    assert stop_after(g_epoch, cfg, epoch=10, epochs_this_run=10) is StopReason.EPOCHS
    # max_epochs_this_run pauses a run before its last epoch, never at it.
    cfg = TrainConfig(stop_loss=1e-3, epochs=10, max_epochs_this_run=2)
    assert stop_after(g_epoch, cfg, epoch=4, epochs_this_run=2) is StopReason.PAUSED
    assert stop_after(g_epoch, cfg, epoch=10, epochs_this_run=2) is StopReason.EPOCHS


# ---------------------------------------------------------------------------------------- another world size


@pytest.mark.slow
def test_two_process_launch_refuses_a_one_process_checkpoint(
    reference: tuple[Path, dict[str, Any]], tiny_shards: Path, tmp_path: Path
) -> None:
    ref_out, _ = reference
    shutil.copytree(ref_out / "checkpoints", tmp_path / "checkpoints")
    cmd = [
        str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "segue_dist.train",
        f"out={tmp_path}", f"data.train={tiny_shards}", *TINY, "epochs=3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # Both ranks ran (world size 2, not one process that found a 1-process checkpoint fine) and refused.
    assert out.count("checkpoint was written by 1 processes, this run has 2") >= 2, out[-3000:]
    assert not (tmp_path / "generator.safetensors").exists()


# ------------------------------------------------------------------------------------------------- curriculum


def test_curriculum_switches_the_distortion_at_its_epoch_and_resumes_exactly(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segue_dist.config import ConfigError, load_config
    from segue_dist.training.config import distortion_at

    stage = ["epochs=3", "curriculum.from_epoch=2", "curriculum.distortion.grayscale_p=1.0"]
    seen: list[tuple[int, float]] = []
    real_begin = train_module.begin_epoch

    def record(s: Any, cfg: Any, epoch: int, *args: Any, **kwargs: Any) -> None:
        real_begin(s, cfg, epoch, *args, **kwargs)
        seen.append((epoch, s.distortion.config.grayscale_p))

    monkeypatch.setattr(train_module, "begin_epoch", record)
    whole = run_train(tmp_path / "whole", tiny_shards, *stage)
    assert seen == [(1, 0.0), (2, 1.0), (3, 1.0)] and whole["last_epoch"] == 3
    # Two epochs, then a rerun with one more: the second stage is rebuilt from the config, bit for bit.
    run_train(tmp_path / "split", tiny_shards, *stage[1:], "epochs=2")
    run_train(tmp_path / "split", tiny_shards, *stage)
    assert_same_weights(generator_state(tmp_path / "split"), generator_state(tmp_path / "whole"))
    # Without the second stage the generator differs: grayscale reached the loss.
    run_train(tmp_path / "plain", tiny_shards, "epochs=3")
    plain, staged = generator_state(tmp_path / "plain"), generator_state(tmp_path / "whole")
    assert any(not torch.equal(plain[k], staged[k]) for k in plain)
    cfg = load_config(TrainConfig, None, ["epochs=4", "curriculum.from_epoch=3", "curriculum.distortion.jpeg_p=0.9"])
    assert distortion_at(cfg, 2).jpeg_p == cfg.distortion.jpeg_p and distortion_at(cfg, 3).jpeg_p == 0.9
    with pytest.raises(ConfigError, match="unknown distortion key"):
        load_config(TrainConfig, None, ["curriculum.from_epoch=2", "curriculum.distortion.greyscale_p=1"])
    with pytest.raises(ConfigError, match="after the last epoch"):
        load_config(TrainConfig, None, ["epochs=2", "curriculum.from_epoch=3"])
    with pytest.raises(ConfigError, match="grayscale_p"):
        load_config(TrainConfig, None, ["curriculum.from_epoch=2", "curriculum.distortion.grayscale_p=2"])
