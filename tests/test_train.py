"""Segue training: Algorithm 1 schedule, config validation, real 2-process DDP and DeepSpeed runs, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segue_dist.checkpoint import CheckpointError, load_generator
from segue_dist.config import ConfigError, load_config
from segue_dist.train import TrainConfig, stage_of

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_algorithm1_stage_schedule() -> None:
    stages = [stage_of(epoch, 5) for epoch in range(1, 12)]
    assert stages == ["f", "g", "g", "g", "g", "f", "g", "g", "g", "g", "f"]


def test_train_config_rejects_unknown_and_mistyped_keys() -> None:
    with pytest.raises(ConfigError, match="optim.lr_gg"):
        load_config(TrainConfig, None, ["optim.lr_gg=1e-3"])
    with pytest.raises(ConfigError, match="epochs"):
        load_config(TrainConfig, None, ["epochs=many"])
    cfg = load_config(TrainConfig, REPO / "configs/train/default.yaml", ["generator.eps=4/255"])
    assert cfg.generator.eps == pytest.approx(4 / 255)


def test_train_config_rejects_too_few_bits() -> None:
    with pytest.raises(ConfigError, match="bits"):
        load_config(TrainConfig, None, ["generator.bits=3", "generator.num_classes=10"])


# ------------------------------------------------------------------------------------------- multi-process runs


@pytest.fixture(scope="module")
def glint_shards(faces_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segue_dist.shards import ShardsConfig, build_shards

    out = tmp_path_factory.mktemp("glint24_32")
    build_shards(
        ShardsConfig(
            src=str(faces_root / "glint24"), out=str(out), test_per_identity=10, size=[32], samples_per_shard=256
        ),
        show_progress=False,
    )
    return out


def launch(config: str, out: Path, shards: Path, *extra: str) -> dict:
    """`accelerate launch` with two gloo processes; returns the run's train_summary.json."""
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate" / config),
        "--num_processes",
        "2",
        "-m",
        "segue_dist.train",
        f"out={out}",
        f"data.train={shards / 'train'}",
        "data.image_size=[32]",
        "data.batch_size=16",
        "data.samples_per_epoch=512",
        "optim.lr_f=2e-3",
        "data.num_workers=1",
        "data.shuffle_buffer=512",
        "generator.width=8",
        "generator.num_res_blocks=1",
        "epochs=3",
        "f_every=2",
        "tensorboard=false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(glint_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ddp")
    return out, launch("cpu_2proc.yaml", out, glint_shards)


@pytest.mark.slow
@pytest.mark.realdata
def test_ddp_two_processes_train_in_sync_and_learn(ddp_run: tuple[Path, dict]) -> None:
    out, summary = ddp_run
    assert summary["world_size"] == 2
    assert summary["ranks_in_sync"] is True
    history = summary["history"]
    assert [h["stage"] for h in history] == ["f", "g", "f"]
    # f learns the (perturbed) identities: its loss falls from the first f epoch to the next.
    assert history[2]["f_ce_on_unlearnable"] < history[0]["f_ce_on_unlearnable"] * 0.95
    generator, meta = load_generator(out / "generator.safetensors")
    assert meta["num_classes"] == 24 and meta["label_source"] == "cls"
    x = torch.rand(3, 3, 32, 32)
    delta = generator(x, torch.tensor([0, 5, 23]))
    assert delta.abs().max() <= meta["eps"] + 1e-6


@pytest.mark.slow
@pytest.mark.realdata
def test_paused_and_resumed_run_matches_uninterrupted(
    ddp_run: tuple[Path, dict], glint_shards: Path, tmp_path: Path
) -> None:
    ref_out, ref = ddp_run
    first = launch("cpu_2proc.yaml", tmp_path, glint_shards, "max_epochs_this_run=1")
    assert first["stop_reason"].startswith("paused") and len(first["history"]) == 1
    assert not (tmp_path / "generator.safetensors").exists()
    resumed = launch("cpu_2proc.yaml", tmp_path, glint_shards)
    assert [h["epoch"] for h in resumed["history"]] == [2, 3]
    assert resumed["steps"] == ref["steps"]
    for mine, theirs in zip(resumed["history"], ref["history"][1:], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert (tmp_path / "generator.safetensors").read_bytes() == (ref_out / "generator.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.realdata
def test_deepspeed_zero1_two_engines_match_ddp(ddp_run: tuple[Path, dict], glint_shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    _, ref = ddp_run
    summary = launch("deepspeed_zero1.yaml", tmp_path, glint_shards)
    assert summary["deepspeed"] is True and summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    for mine, theirs in zip(summary["history"], ref["history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    load_generator(tmp_path / "generator.safetensors")


def test_exported_generator_loads_strictly(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from segue_dist.checkpoint import export_generator
    from segue_dist.models.generator import GeneratorConfig, SegueGenerator

    generator = SegueGenerator(GeneratorConfig(num_classes=4, width=8, num_res_blocks=1))
    weights = export_generator(generator, tmp_path, label_map={"a": 0}, label_source="cls")
    loaded, meta = load_generator(weights)
    assert meta["bits"] == 16 and meta["label_map_sha256"]
    for (name, a), b in zip(generator.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # A tampered file (one tensor with another shape) must fail loudly, not load partially.
    state = load_file(str(weights))
    first = next(iter(state))
    state[first] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError):
        load_generator(weights)
    meta_path = tmp_path / "generator.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = ""
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_generator(weights)
