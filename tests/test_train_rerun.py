"""Running `segue train` again on the `out=` of a finished run: it says so in one line, exits 0 and touches no file;
raising `epochs` continues from the checkpoint; a run stopped on `stop_loss` stays stopped until stop_loss is lowered
below the loss it stopped at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_testing import build_tiny_shards, run_train, tiny_overrides

from segue_dist.train import main as train_main


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("tiny"))


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``out``: (bytes, mtime in ns)."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def rerun(out: Path, shards: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """`segue train` through its command line (what `accelerate launch -m segue_dist.train` runs) on ``out`` again;
    asserts exit code 0 and returns what it printed."""
    capsys.readouterr()
    assert train_main(tiny_overrides(out, shards, *extra)) == 0
    return capsys.readouterr().out


def assert_finished_untouched(out: Path, shards: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """Rerun ``out``: nothing is written, created or even rewritten with the same bytes; returns the one line."""
    before = snapshot(out)
    printed = rerun(out, shards, capsys, *extra)
    assert snapshot(out) == before
    lines = printed.strip().splitlines()
    assert len(lines) == 1, printed  # no banner, no progress bar, no table
    assert lines[0].startswith(f"{out} is finished ("), printed
    assert "nothing to do" in lines[0] and "choose a new out=" in lines[0], printed
    return lines[0]


def epochs_run(out: Path) -> int:
    return json.loads((out / "generator.json").read_text())["epochs_run"]


def test_rerunning_a_finished_run_touches_nothing(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_train(tmp_path, tiny_shards, "epochs=2")
    line = assert_finished_untouched(tmp_path, tiny_shards, capsys, "epochs=2")
    assert "(2/2 epochs, stopped: epochs)" in line and "raise epochs=N (N > 2)" in line
    assert epochs_run(tmp_path) == 2
    # Asking for fewer epochs than were run is finished too: the line says what was run.
    assert "(2/2 epochs, stopped: epochs)" in assert_finished_untouched(tmp_path, tiny_shards, capsys, "epochs=1")


def test_raising_epochs_continues_from_the_checkpoint(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = tmp_path / "reference"
    run_train(reference, tiny_shards, "epochs=2")
    run_train(tmp_path / "run", tiny_shards, "epochs=1")
    assert epochs_run(tmp_path / "run") == 1
    summary = run_train(tmp_path / "run", tiny_shards, "epochs=2")
    assert [h["epoch"] for h in summary["history"]] == [2] and summary["steps"] == 12
    assert summary["stop_reason"] == "epochs" and summary["last_epoch"] == 2
    assert epochs_run(tmp_path / "run") == 2
    # 1 epoch, then 1 more: the same generator as 2 epochs in one go, bit for bit.
    assert (tmp_path / "run" / "generator.safetensors").read_bytes() == (
        reference / "generator.safetensors"
    ).read_bytes()
    # ... and now that one is finished too.
    assert "(2/2 epochs" in assert_finished_untouched(tmp_path / "run", tiny_shards, capsys, "epochs=2")


def test_a_run_stopped_on_stop_loss_stays_stopped_until_stop_loss_is_lowered(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # stop_loss=100: f's first epoch (joint: f trains every epoch) is "below" it, so the run stops after 1 of 3.
    first = run_train(tmp_path, tiny_shards, "epochs=3", "stop_loss=100")
    assert first["last_epoch"] == 1 and first["stop_reason"].startswith("f's loss on unlearnable examples")
    f_loss = first["history"][0]["f_ce_on_unlearnable"]
    checkpoint = json.loads((tmp_path / "checkpoints" / "last.json").read_text())["position"]
    assert checkpoint["stop"] == {"reason": "stop_loss", "epochs": 3, "f_loss": f_loss, "stop_loss": 100.0}

    line = assert_finished_untouched(tmp_path, tiny_shards, capsys, "epochs=3", "stop_loss=100")
    assert f"(1/3 epochs, stopped: f's loss on unlearnable examples {f_loss:.2e} < 100)" in line
    assert f"lower stop_loss below {f_loss:.2e}" in line and "raise epochs" not in line
    # More epochs do not undo the stop, nor does a stop_loss still above the loss it stopped at.
    assert_finished_untouched(tmp_path, tiny_shards, capsys, "epochs=4", "stop_loss=100")
    assert_finished_untouched(tmp_path, tiny_shards, capsys, "epochs=3", f"stop_loss={f_loss * 1.01}")

    # stop_loss=0 turns the early stop off: epochs 2 and 3 run from the checkpoint.
    resumed = run_train(tmp_path, tiny_shards, "epochs=3", "stop_loss=0")
    assert [h["epoch"] for h in resumed["history"]] == [2, 3] and resumed["stop_reason"] == "epochs"
    assert epochs_run(tmp_path) == 3


def test_a_finished_checkpoint_without_its_export_is_exported_not_trained(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_train(tmp_path, tiny_shards, "epochs=1")
    exported = {name: (tmp_path / name).read_bytes() for name in ("generator.safetensors", "generator.json")}
    checkpoint = snapshot(tmp_path / "checkpoints")
    for name in ("generator.safetensors", "generator.json", "train_summary.json"):  # killed after the last checkpoint
        (tmp_path / name).unlink()
    summary = run_train(tmp_path, tiny_shards, "epochs=1")
    assert summary["history"] == [] and summary["last_epoch"] == 1 and summary["stop_reason"] == "epochs"
    assert {name: (tmp_path / name).read_bytes() for name in exported} == exported  # epochs_run 1, the same weights
    assert snapshot(tmp_path / "checkpoints") == checkpoint  # not trained
    assert_finished_untouched(tmp_path, tiny_shards, capsys, "epochs=1")
