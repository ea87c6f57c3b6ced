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
# torch's and oneDNN's AVX2 kernels on any x86-64 CPU: an AVX-512 machine computes what an AVX2-only one does.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# The bound, from the demo's measured spread (docs/protection_research.md, "Test bounds"): Segue at most 0.55 of
# the clean victim and at most 2.7x chance (27% for 10 identities).
MAX_FRACTION_OF_CLEAN = 0.55
MAX_X_CHANCE = 2.7


def protects(acc: float, clean: float, chance: float) -> bool:
    """The assertion the Segue row and the unprotected control (the clean row itself, ε = 0) are held to."""
    return acc <= MAX_FRACTION_OF_CLEAN * clean and acc <= MAX_X_CHANCE * chance


@pytest.mark.slow
def test_demo_runs_the_whole_path_and_resumes(tmp_path: Path) -> None:
    """The demo end to end, its report's protection gap, and a rerun that only re-reports. Bound: the Segue row
    measured 15.5% against 49.0% clean under the AVX2 variables this test sets (on this CPU and, before the demo
    dropped its JPEG-10 rows, 16.0% against 49.0% on an AVX2-only EPYC), 16.5% against 51.5% with AVX-512 kernels;
    other demo seeds under the AVX2 variables: docs/measurements.md, "Demo time budget". min(0.55 × clean,
    2.7 × chance), about 27%, puts seed 0 at 57-61% of the bound, and the clean row, the unprotected control, fails
    it by more than 20 points (docs/protection_research.md, "Test bounds")."""
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "segue_dist.cli", "demo", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **AVX2}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    stages = json.loads((out / "demo_summary.json").read_text())["seconds"]
    assert set(stages) == {"shards", "train", "protect", "evaluate", "report"}, stages
    summary = json.loads((out / "generator" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    manifest = json.loads((out / "protected" / "train" / "_manifest.json").read_text())
    assert manifest["samples_in"] == manifest["samples_out"] == 10 * 180
    assert not (out / "pseudo").exists()  # the supervised run trains on the true labels: no K-means stage
    assert (out / "report" / "report.html").is_file()

    # The report shows protection: a victim trained on the protected corpus scores far below the clean victim on
    # clean test faces, and the same assertion fails for the unprotected set.
    rows = {r["name"]: r for r in json.loads((out / "eval" / "results.json").read_text())["rows"]}
    clean, segue = rows["clean__resnet18__none"], rows["segue__resnet18__none"]
    chance = segue["chance"]
    assert clean["final_acc"] >= 3 * clean["chance"], clean["final_acc"]  # the corpus is learnable
    assert protects(segue["final_acc"], clean["final_acc"], chance), (segue["final_acc"], clean["final_acc"])
    assert not protects(clean["final_acc"], clean["final_acc"], chance), clean["final_acc"]
    report = (out / "report" / "report.md").read_text()
    assert f"{segue['final_acc']:.2f}" in report and f"{clean['final_acc']:.2f}" in report

    # A second run finds every stage done and only re-reports.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "generator" / "train_summary.json").read_text()) == summary
