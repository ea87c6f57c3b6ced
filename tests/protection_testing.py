"""Shared by the protection tests: `segue` run as a user runs it under the AVX2 kernels, and the victims that
measure a protected training split against its clean original and a random-noise control at the same ε."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# torch's and oneDNN's AVX2 kernels, which every x86-64 CPU this project supports has: an AVX-512 machine computes
# what an AVX2-only one does.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def segue(*args: str, timeout: int = 2400) -> None:
    """Run one `segue` command in a subprocess; assert it succeeds, with its output's tail on failure."""
    cmd = [sys.executable, "-m", "segue_dist.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def victim_accuracies(protected: Path, clean: Path, test: Path, work: Path, seed: str) -> dict[str, float]:
    """Clean-test accuracy (percent) of the standard-stem ResNet-18 (8 epochs) trained on the protected split, on
    the clean split, and on the clean split perturbed by random noise at ε = 8/255; plus the test split's chance.

    Returns ``{"segue", "clean", "random", "chance"}``.
    """
    noise = work / "random" / "train"
    segue("evaluate", "baseline", "--method", "random", "--in", str(clean), "--out", str(noise),
          "--eps", "8/255", "--seed", seed)  # fmt: skip
    results = work / "eval"
    victim = ["train.epochs=8", "train.small_stem=false", "train.workers=1", f"train.seed={seed}"]
    segue(
        "evaluate", "victim", "--train", str(protected), "--test", str(test), "--clean-train", str(clean),
        "--control", "--out", str(results), "--device", "cpu", "method=segue", *victim,
    )  # fmt: skip
    segue("evaluate", "victim", "--train", str(noise), "--test", str(test), "--out", str(results),
          "--device", "cpu", "method=random", *victim)  # fmt: skip
    acc = {m: json.loads((results / f"{m}__resnet18__none.json").read_text()) for m in ("segue", "clean", "random")}
    return {**{m: float(r["final_acc"]) for m, r in acc.items()}, "chance": float(acc["segue"]["chance"])}
