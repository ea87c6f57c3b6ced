"""Segue training: Algorithm 1 schedule, config validation, real 2-process DDP and DeepSpeed runs, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segue_dist.config import ConfigError, load_config
from segue_dist.train import TrainConfig, stage_of
from segue_dist.weights import CheckpointError, load_generator

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


# ------------------------------------------------------------------------------------------------- loader workers


def test_loader_workers_are_capped_to_each_process_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/train/default.yaml asks for 4 loader workers; two launched processes on 2 cores get 1 each, and the
    banner says why (what torch printed twice as a UserWarning before)."""
    from segue_dist.training.build import loader_workers
    from segue_dist.utils.device import cpus_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # set by torchrun, so by accelerate launch
    assert cpus_per_process() == 1
    assert loader_workers(4, 13) == (1, "data.num_workers=4 capped to the 1 CPU(s) per process")
    assert loader_workers(0, 13) == (0, "")  # loading in the main process stays so
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(4, 13)[0] == 2 and loader_workers(2, 13) == (2, "")
    assert loader_workers(2, 1) == (1, "data.num_workers=2 capped to the 1 batch(es) per epoch")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers(4, 13) == (4, "")  # a bigger machine gets what the config asks for


def test_capped_workers_pass_torchs_own_check() -> None:
    """The cap keeps a process within torch's suggestion for this machine; the control: more workers than cores
    still draws torch's warning."""
    import warnings

    from torch.utils.data import DataLoader

    from segue_dist.utils.device import capped_workers

    def warns(workers: int) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DataLoader(range(4), num_workers=workers).check_worker_number_rationality()
        return any("suggested max number of worker" in str(w.message) for w in caught)

    too_many = len(os.sched_getaffinity(0)) + 2
    assert warns(too_many)
    assert not warns(capped_workers(too_many))


# ------------------------------------------------------------------------------------------- multi-process runs


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
def test_ddp_two_processes_train_in_sync_and_learn(ddp_run: tuple[Path, dict], tmp_path: Path) -> None:
    """Bound: f's loss fell from 3.216 to 2.718 (to 0.85 of the first), measured with AVX-512 kernels on the
    project's 2-core AMD EPYC, bit for bit the same under DeepSpeed; the 5% fall asked for is under a third of that."""
    out, summary = ddp_run
    assert summary["world_size"] == 2
    assert summary["ranks_in_sync"] is True
    history = summary["history"]
    assert [h["stage"] for h in history] == ["f", "g", "f"]
    # f learns the (perturbed) identities: its loss falls from the first f epoch to the next.
    assert history[2]["f_ce_on_unlearnable"] < history[0]["f_ce_on_unlearnable"] * 0.95
    generator, meta = load_generator(out / "generator.safetensors")
    assert meta["num_classes"] == 24 and meta["label_source"] == "cls"
    assert_protected_files_within_eps(generator, meta["eps"], [0, 5, 23], tmp_path)


def assert_protected_files_within_eps(generator: torch.nn.Module, eps: float, labels: list[int], out: Path) -> int:
    """Protect random 32 px images with ``generator`` through `segue protect`'s own path (`Perturber`: G and the
    integer quantiser; `encode_image`: PNG), write each file, decode it back from disk and compare it with its
    original: no pixel past round(255·ε) levels, and every image moved somewhere (a G that outputs 0, or a quantiser
    that drops δ, fails). Returns the largest move in levels."""
    from segue_dist.data.images import decode_image
    from segue_dist.protect import Perturber, eps_levels
    from segue_dist.protect.codecs import EncodeSpec, encode_image

    rng = torch.Generator().manual_seed(0)
    originals = torch.randint(0, 256, (len(labels), 32, 32, 3), dtype=torch.uint8, generator=rng)
    perturber = Perturber(generator, torch.device("cpu"), eps_levels(eps), precision="fp32")
    protected = perturber(originals, torch.tensor(labels)).numpy()
    spec = EncodeSpec("png", png_level=1, jpeg_quality=95, eps_levels=eps_levels(eps))
    moves = []
    for i, (image, original) in enumerate(zip(protected, originals.numpy(), strict=True)):
        path = out / f"protected_{i}.png"
        path.write_bytes(encode_image(image, spec))
        written = np.asarray(decode_image(path.read_bytes()), dtype=np.int16)
        moves.append(int(np.abs(written - original.astype(np.int16)).max()))
    assert max(moves) <= round(255 * eps), moves
    assert min(moves) > 0, f"no pixel moved in some protected file: {moves}"
    return max(moves)


class ConstantDelta(torch.nn.Module):
    """A stand-in G whose δ is ``value`` everywhere, whatever the image."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


def test_protected_files_stay_within_eps_and_carry_the_generators_delta(tmp_path: Path) -> None:
    from segue_dist.models.generator import GeneratorConfig, SegueGenerator

    torch.manual_seed(0)
    generator = SegueGenerator(GeneratorConfig(num_classes=4, width=8, num_res_blocks=1))
    assert_protected_files_within_eps(generator, generator.config.eps, [0, 1, 2, 3], tmp_path)
    # The bound is the quantiser's, not G's: a δ of 3ε reaches the files as exactly ε.
    assert assert_protected_files_within_eps(ConstantDelta(3 * 8 / 255), 8 / 255, [0, 1], tmp_path) == 8
    # A G that outputs nothing is caught: the files equal their originals.
    with pytest.raises(AssertionError, match="no pixel moved"):
        assert_protected_files_within_eps(ConstantDelta(0.0), 8 / 255, [0, 1], tmp_path)


def assert_pause_and_resume_match(config: str, reference: tuple[Path, dict], shards: Path, out: Path) -> None:
    """Run 1 of 3 epochs, pause, resume: the resumed epochs and the exported generator equal the uninterrupted run's."""
    ref_out, ref = reference
    first = launch(config, out, shards, "max_epochs_this_run=1")
    assert first["stop_reason"].startswith("paused") and len(first["history"]) == 1
    assert not (out / "generator.safetensors").exists()
    resumed = launch(config, out, shards)
    assert [h["epoch"] for h in resumed["history"]] == [2, 3]
    assert resumed["steps"] == ref["steps"] and resumed["deepspeed"] == ref["deepspeed"]
    for mine, theirs in zip(resumed["history"], ref["history"][1:], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert (out / "generator.safetensors").read_bytes() == (ref_out / "generator.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.realdata
def test_paused_and_resumed_run_matches_uninterrupted(
    ddp_run: tuple[Path, dict], glint_shards: Path, tmp_path: Path
) -> None:
    assert_pause_and_resume_match("cpu_2proc.yaml", ddp_run, glint_shards, tmp_path)


@pytest.fixture(scope="module")
def deepspeed_run(glint_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    return out, launch("deepspeed_zero1.yaml", out, glint_shards)


@pytest.mark.slow
@pytest.mark.realdata
def test_deepspeed_zero1_two_engines_match_ddp(ddp_run: tuple[Path, dict], deepspeed_run: tuple[Path, dict]) -> None:
    _, ref = ddp_run
    out, summary = deepspeed_run
    assert summary["deepspeed"] is True and summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    for mine, theirs in zip(summary["history"], ref["history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    load_generator(out / "generator.safetensors")


@pytest.mark.slow
@pytest.mark.realdata
def test_deepspeed_paused_and_resumed_run_matches_uninterrupted(
    deepspeed_run: tuple[Path, dict], glint_shards: Path, tmp_path: Path
) -> None:
    # DeepSpeed's own checkpoint format (engines, ZeRO optimiser partitions) plus position.json, which records the
    # world size as the DDP checkpoint does.
    assert_pause_and_resume_match("deepspeed_zero1.yaml", deepspeed_run, glint_shards, tmp_path)
    assert json.loads((tmp_path / "checkpoints" / "position.json").read_text())["world_size"] == 2


def test_exported_generator_loads_strictly(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from segue_dist.models.generator import GeneratorConfig, SegueGenerator
    from segue_dist.weights import export_generator

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


# ------------------------------------------------------------------------------------------- the steps themselves


def _step_fixture(schedule: str) -> tuple:
    """A tiny G and f (one process, CPU), a fixed labelled batch and a distortion layer without randomness."""
    from segue_dist.distortion import DistortionConfig, DistortionLayer
    from segue_dist.train import Runner, build_models, make_runtime

    cfg = load_config(
        TrainConfig,
        None,
        [
            "generator.width=8",
            "generator.num_res_blocks=1",
            "generator.side_info=template",
            "generator.template_size=4",
            "generator.eps=0.25",  # a large budget, so that 10 steps move an untrained f measurably
            "optim.lr_g=1e-2",
            "optim.lr_f=1e-3",
            f"schedule={schedule}",
            "data.image_size=[32]",
            "surrogate.small_stem=false",
        ],
    )
    rt = make_runtime(cfg)
    generator, surrogate = build_models(cfg, num_classes=4)
    g = Runner("g", generator, torch.optim.Adam(generator.parameters(), lr=cfg.optim.lr_g), rt, None)
    f = Runner("f", surrogate, torch.optim.Adam(surrogate.parameters(), lr=cfg.optim.lr_f), rt, None)
    distortion = DistortionLayer(
        DistortionConfig(pgd=False, blur=False, sharpness=False, jpeg=False, rescale=False, hflip_p=0.0, vflip_p=0.0)
    )
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 4
    return cfg, rt, g, f, distortion, x, y


def _surrogate_ce(g, f, x, y) -> float:
    f.module.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(f.module(x + g.module(x, y)), y))


def test_g_step_lowers_the_frozen_surrogates_loss_on_the_protected_batch() -> None:
    """Bound: 10 steps took the frozen f's CE from 1.406 to 1.224 with AVX-512 kernels and to 1.194 with AVX2 kernels
    (the project's 2-core AMD EPYC); the 0.05 asked for is under a third of the smaller drop."""
    from segue_dist.train import g_step, set_requires_grad

    cfg, rt, g, f, distortion, x, y = _step_fixture("alternate")
    set_requires_grad(f.module, False)  # as the training loop does in a G epoch
    f0 = [p.detach().clone() for p in f.module.parameters()]
    before = _surrogate_ce(g, f, x, y)
    rng = torch.Generator().manual_seed(0)
    for _ in range(10):
        g_step(g, f, distortion, x, y, cfg, rt, rng)
    after = _surrogate_ce(g, f, x, y)
    # G moves δ toward what f already reads as ŷ: error-minimising, never error-maximising.
    assert after < before - 0.05, (before, after)
    # f is frozen during a G step.
    assert all(torch.equal(a, b) for a, b in zip(f0, f.module.parameters(), strict=True))


def test_joint_step_lowers_the_loss_and_updates_both_players() -> None:
    """Bound: 15 steps took the CE from 1.53 to about 1e-4 with AVX-512 and AVX2 kernels alike (the project's 2-core
    AMD EPYC); 0.7 of the first is far above that."""
    from segue_dist.train import joint_step

    cfg, rt, g, f, distortion, x, y = _step_fixture("joint")
    g0 = [p.detach().clone() for p in g.module.parameters()]
    f0 = [p.detach().clone() for p in f.module.parameters()]
    rng = torch.Generator().manual_seed(0)
    losses = [joint_step(g, f, distortion, x, y, cfg, rt, rng)[1] for _ in range(15)]
    assert losses[-1] < losses[0] * 0.7, losses
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.module.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(f0, f.module.parameters(), strict=True))


def test_joint_schedule_runs_every_epoch_joint() -> None:
    assert [stage_of(e, 5, "joint") for e in (1, 2, 6)] == ["joint", "joint", "joint"]
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="both")
