"""How long `segue demo` takes after the install, with the CPU's own kernels and with torch's and oneDNN's AVX2
kernels (what an AVX2-only x86-64 CPU runs), and what its report shows each time.

Usage (repo root; each run takes minutes and wants both cores to itself)::

    .venv/bin/python bench/demo_time.py                         # native and avx2 -> bench/results/demo/demo_time.json
    .venv/bin/python bench/demo_time.py --kinds avx2 --seeds 0,1,2

Each run is ``segue demo --fresh --out <scratch>/<kind>_seed<s> --seed <s>`` as a user types it (the seed draws the
corpus and G's initialisation). The JSON keeps, per run: the demo's own per-stage seconds (``demo_summary.json``),
the wall time of the whole command, the CPU capability torch dispatched to, and the clean and Segue rows of its
report (clean-test accuracy, chance); plus the machine and its load average before and after. A rerun merges into
the JSON, replacing the runs it repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from protect_throughput import machine_info  # noqa: E402

from segue_dist.utils.io import atomic_write_json  # noqa: E402

KINDS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def run_demo(kind: str, seed: int, out: Path) -> dict[str, Any]:
    """One fresh `segue demo` under ``kind``'s kernels; its timings and report rows."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **KINDS[kind]}
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        if var not in KINDS[kind]:
            env.pop(var, None)
    cmd = [sys.executable, "-m", "segue_dist.cli", "demo", "--fresh", "--out", str(out), "--seed", str(seed)]
    load_before = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"demo_time: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "demo_summary.json").read_text())
    rows = {r["name"]: r for r in json.loads((out / "eval" / "results.json").read_text())["rows"]}
    clean, segue = rows["clean__resnet18__none"], rows["segue__resnet18__none"]
    return {
        "kind": kind,
        "seed": seed,
        "wall_s": round(wall, 1),
        "seconds": summary["seconds"],
        "cpu_capability": summary["cpu_capability"],
        "clean_acc": clean["final_acc"],
        "segue_acc": segue["final_acc"],
        "chance": segue["chance"],
        "segue_over_clean": round(segue["final_acc"] / clean["final_acc"], 3),
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="native,avx2", help="comma list of: " + ", ".join(KINDS))
    parser.add_argument("--seeds", default="0", help="comma list of demo seeds")
    parser.add_argument("--scratch", default="/tmp/segue_demo_time", help="where the demos write (removed after)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "demo" / "demo_time.json"))
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"demo_time: unknown --kinds {unknown}; choose from {list(KINDS)}")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    result["machine"] = machine_info()
    for kind in kinds:
        for seed in (int(s) for s in args.seeds.split(",")):
            scratch = Path(args.scratch) / f"{kind}_seed{seed}"
            run = run_demo(kind, seed, scratch)
            shutil.rmtree(scratch, ignore_errors=True)
            print(json.dumps(run))
            result["runs"] = [r for r in result["runs"] if (r["kind"], r["seed"]) != (kind, seed)] + [run]
            atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
