"""The memory of one `segue protect` rank over a long run: its RSS every 2 s against the shards it has finished.

A flat trace is what lets the job run over any number of faces; a line that climbs with the shards finished is a
per-sample leak (the million-face rehearsal, ``bench/corpus_rehearsal.py``, reports only the peak).

Usage (repo root; needs ``$SEGUE_FACES`` or ``../shared/data`` for lfw423)::

    .venv/bin/python bench/protect_rss_trace.py --copies 30          # 179,550 samples -> bench/results/protect_rss_trace.json

The lfw423 faces are sharded once at 32 px (shards of 5,000) and the shard files are linked ``--copies`` times
into one input set (keys repeat across copies; protect does not mind), then protected by one rank (one loader worker,
one encoder, one G thread) with the default config's G, random weights. The JSON keeps the trace, the samples, the
seconds and the RSS at the first and the last finished shard; a rerun replaces the entry of the same ``--name``.
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

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from corpus_rehearsal import make_generator  # noqa: E402

from segue_dist.utils.io import atomic_write_json  # noqa: E402


def linked_input(base: Path, folder: Path, copies: int) -> int:
    """``copies`` links to each of ``base``'s shards as one input set in ``folder``; returns the samples."""
    sizes = json.loads((base / "sizes.json").read_text())
    linked: dict[str, int] = {}
    folder.mkdir(parents=True)
    for _ in range(copies):
        for tar in sorted(sizes):
            name = f"{len(linked):05d}.tar"
            (folder / name).symlink_to(base / tar)
            linked[name] = sizes[tar]
    (folder / "sizes.json").write_text(json.dumps(linked))
    shutil.copy(base / "labels.json", folder / "labels.json")
    return sum(linked.values())


def trace_rank(cmd: list[str], out: Path) -> tuple[list[list[float]], float]:
    """Run one rank to the end, sampling (seconds, shards finished, RSS MiB) every 2 s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trace = []
    while proc.poll() is None:
        try:
            rss = psutil.Process(proc.pid).memory_info().rss / 2**20
            trace.append([round(time.perf_counter() - start, 1), len(list(out.glob("*._stats.json"))), round(rss)])
        except psutil.Error:
            pass
        time.sleep(2)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"protect_rss_trace: protect failed ({proc.returncode}): {err[-2000:]}")
    return trace, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--name", default="after_fix", help="the entry this run writes")
    parser.add_argument("--work", default="/tmp/segue_rss_trace", help="scratch folder (removed first)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "protect_rss_trace.json"))
    args = parser.parse_args()
    faces = Path(os.environ.get("SEGUE_FACES", REPO.parent / "shared" / "data")) / "lfw423"
    if not faces.is_dir():
        raise SystemExit(f"protect_rss_trace: {faces} not found (set SEGUE_FACES)")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    build = [sys.executable, "-m", "segue_dist.cli", "shards", "build", "--src", str(faces), "--out", str(work / "base"),
             "--size", "32", "--samples-per-shard", "5000", "--test-per-identity", "0"]  # fmt: skip
    subprocess.run(build, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    samples = linked_input(work / "base" / "train", work / "in", args.copies)
    labels = json.loads((work / "base" / "train" / "labels.json").read_text())["labels"]
    generator = make_generator(work / "generator", labels)
    cmd = [sys.executable, "-m", "segue_dist.protect", "--generator", str(generator), "--in", str(work / "in"),
           "--out", str(work / "out"), "--no-progress", "--device", "cpu", "--workers", "1", "--encode-workers", "1",
           "--threads", "1"]  # fmt: skip
    trace, seconds = trace_rank(cmd, work / "out")
    started = [t for t in trace if t[1] >= 1]
    entry = {
        "samples": samples,
        "shards": len(list((work / "in").glob("*.tar"))),
        "seconds": round(seconds, 1),
        "rss_mib_at_first_shard": started[0][2] if started else None,
        "rss_mib_at_end": trace[-1][2] if trace else None,
        "trace_s_shards_rss_mib": trace,
    }
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result[args.name] = entry
    atomic_write_json(out, result)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in entry.items() if k != "trace_s_shards_rss_mib"}))


if __name__ == "__main__":
    main()
