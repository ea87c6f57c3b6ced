"""The README's main job, end to end, at a small scale: corpus -> shards -> pseudo-labels -> 2-process training ->
protect -> evaluation sweep -> report. It needs no data from ../shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_whole_path_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "segue_dist.cli", "demo", "--out", str(out), "--identities", "4", "--per-identity", "16",
        "--test-per-identity", "4", "--size", "32", "--samples-per-shard", "16", "--epochs", "2",
        "--extractor-epochs", "1", "--victim-epochs", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((out / "generator" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    manifest = json.loads((out / "protected" / "train" / "_manifest.json").read_text())
    assert manifest["samples_in"] == manifest["samples_out"] == 4 * 12
    sidecar = json.loads((out / "pseudo" / "pseudo_labels.json").read_text())
    assert sidecar["k"] == 4 and sidecar["num_samples"] == 48
    report = (out / "report" / "report.md").read_text()
    assert "segue" in report and (out / "report" / "report.html").is_file()

    # A second run finds every stage done and only re-reports.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "generator" / "train_summary.json").read_text()) == summary
