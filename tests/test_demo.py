"""The README's main job, end to end: corpus -> shards -> 2-process training -> protect ->
evaluation sweep -> report, on the synthetic corpus at the demo's own scale (10 identities x 200 shots, G and victims
at 32 px), and its report must show protection. It needs no data from ../shared."""

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
        sys.executable, "-m", "segue_dist.cli", "demo", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((out / "generator" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    manifest = json.loads((out / "protected" / "train" / "_manifest.json").read_text())
    assert manifest["samples_in"] == manifest["samples_out"] == 10 * 180
    assert not (out / "pseudo").exists()  # the supervised run trains on the true labels: no K-means stage
    assert (out / "report" / "report.html").is_file()

    # The report shows protection (issue 12, 5c): a victim trained on the protected corpus scores at most a third
    # of the clean victim and at most 4x chance on clean test faces.
    rows = {r["name"]: r for r in json.loads((out / "eval" / "results.json").read_text())["rows"]}
    clean, segue = rows["clean__resnet18__none"], rows["segue__resnet18__none"]
    assert clean["final_acc"] >= 3 * clean["chance"], clean["final_acc"]  # the corpus is learnable
    assert segue["final_acc"] <= clean["final_acc"] / 3, (segue["final_acc"], clean["final_acc"])
    assert segue["final_acc"] <= 4 * segue["chance"], segue["final_acc"]
    report = (out / "report" / "report.md").read_text()
    assert f"{segue['final_acc']:.2f}" in report and f"{clean['final_acc']:.2f}" in report

    # A second run finds every stage done and only re-reports.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "generator" / "train_summary.json").read_text()) == summary
