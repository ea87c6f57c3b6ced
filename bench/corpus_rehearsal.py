"""A corpus-scale rehearsal of the shard job on one machine: N distinct faces, `segue shards build`, a 2-rank
`segue protect` with one rank killed by SIGKILL midway and the job rerun, everything checked from what is read back.

Usage (repo root; the full run takes hours on 2 cores: measured times in ``docs/protect_benchmarks.md``)::

    .venv/bin/python bench/corpus_rehearsal.py                      # 1,000,000 faces -> bench/results/corpus_rehearsal.json
    .venv/bin/python bench/corpus_rehearsal.py --faces 10000        # a development run

Stages (each timed; ``images_per_s`` is N / the stage's seconds for every stage, the rerun's included):

1. ``generate``: real faces (``$SEGUE_FACES``: glint24 + lfw423, resized to 36 px) cycled into N samples, each
   re-keyed and jittered (a 32 px crop at one of 25 offsets, a flip, a brightness shift of -3..+3 levels, and the
   sample's index written into the low bit of 24 blue pixels), so every sample is a distinct image (checked: the
   number of distinct pixel digests is reported). Written as PNG into plain source tars, identity in ``.cls``.
2. ``shards_build``: ``segue shards build --size 32`` (JPEG q95 shards, as users build them).
3. ``protect_killed``: ranks 0 and 1 (``RANK`` / ``WORLD_SIZE``: no collectives, as on a cluster) with one loader
   worker, one encoder and one G thread each; once a third of the shards are finished, rank 1's process group gets
   SIGKILL (a node lost mid-shard); rank 0 goes on to the end of its share.
4. ``protect_rerun``: both ranks again: finished shards are skipped, the killed rank's unfinished ones redone.
5. ``verify``: every output tar read back with Python's ``tarfile`` (not the project's reader): keys out, duplicate
   keys, keys missing against the input shards (read the same way), and |written - original| <= ε on every PNG
   (the original: the input shard's JPEG decoded by PIL); the manifest must balance.
6. ``kmeans``: FAISS K-means on the CPU over N x 128 synthetic embeddings (``bench/kmeans.py``'s mixture), with its
   time and peak RSS.

Peak RSS per rank (the rank's main process, and USS of its process tree: loader workers included) is sampled every
0.5 s; ``--baseline`` (10,000 faces) runs stages 1-4 (without the kill) first, so that the JSON compares peak RSS at
10k and at N. The load average of the machine is recorded at the start and at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segue_dist.utils.io import atomic_write_json, read_json  # noqa: E402

RESULTS = REPO / "bench" / "results"
SIZE = 32
BASE = 36  # faces are resized to this, then cropped to SIZE at one of (BASE - SIZE + 1)^2 offsets
SIGNATURE_BITS = 24  # the sample index in the low bits of this many blue pixels: distinct for N < 2^24
PER_SOURCE_TAR = 10_000
EPS_LEVELS = 8


def per_shard(n: int) -> int:
    """Samples per shard: 5,000 at a million (200 shards), fewer for small runs so that the kill lands mid-set."""
    return min(5000, max(250, n // 200))


# --------------------------------------------------------------------------------------------------- measuring


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class RssSampler:
    """Peak RSS (main process) and USS (process tree) per named process, sampled on each :meth:`sample`."""

    def __init__(self) -> None:
        self.peaks: dict[str, dict[str, float]] = {}

    def sample(self, name: str, pid: int) -> None:
        try:
            main = psutil.Process(pid)
            procs = [main, *main.children(recursive=True)]
            rss = main.memory_info().rss
            uss = sum(p.memory_full_info().uss for p in procs)
        except psutil.Error:
            return
        peak = self.peaks.setdefault(name, {"main_rss_mib": 0.0, "tree_uss_mib": 0.0})
        peak["main_rss_mib"] = max(peak["main_rss_mib"], round(rss / 2**20, 1))
        peak["tree_uss_mib"] = max(peak["tree_uss_mib"], round(uss / 2**20, 1))


def run_measured(cmd: list[str], sampler: RssSampler, name: str, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` to the end, sampling its memory; seconds; ``RuntimeError`` with its stderr if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        sampler.sample(name, proc.pid)
        time.sleep(0.5)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {err[-3000:]}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------ stage 1


def load_faces(root: Path) -> tuple[list[np.ndarray], list[str]]:
    """Every face under glint24/ and lfw423/ (identity folders) as BASE x BASE RGB, and its identity."""
    faces, identities = [], []
    for dataset in ("glint24", "lfw423"):
        for ident in sorted(p for p in (root / dataset).iterdir() if p.is_dir()):
            for path in sorted(ident.iterdir()):
                with Image.open(path) as img:
                    small = img.convert("RGB").resize((BASE, BASE), Image.Resampling.BICUBIC, reducing_gap=3.0)
                faces.append(np.asarray(small, dtype=np.uint8))
                identities.append(f"{dataset}_{ident.name.replace(' ', '_')}")
    return faces, identities


def jittered(face: np.ndarray, index: int) -> np.ndarray:
    """Sample ``index``'s variant of a BASE px face: crop offset, flip and brightness from its index, and the index
    itself in the low bit of SIGNATURE_BITS blue pixels (so two samples never share their pixels)."""
    rng = np.random.default_rng(index)
    span = BASE - SIZE + 1
    dy, dx = int(rng.integers(span)), int(rng.integers(span))
    out = face[dy : dy + SIZE, dx : dx + SIZE].astype(np.int16)
    if rng.integers(2):
        out = out[:, ::-1]
    out = np.clip(out + int(rng.integers(-3, 4)), 0, 255).astype(np.uint8)
    blue = out[0, :SIGNATURE_BITS, 2]
    bits = (index >> np.arange(SIGNATURE_BITS)) & 1
    out[0, :SIGNATURE_BITS, 2] = (blue & 0xFE) | bits.astype(np.uint8)
    return np.ascontiguousarray(out)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def generate_sources(src: Path, n: int, faces_root: Path) -> dict[str, Any]:
    """N jittered faces into plain tars of PER_SOURCE_TAR samples; returns counts and the distinctness check."""
    faces, identities = load_faces(faces_root)
    src.mkdir(parents=True, exist_ok=True)
    digests = np.empty(n, dtype=np.uint64)
    for first in range(0, n, PER_SOURCE_TAR):
        with tarfile.open(src / f"src_{first // PER_SOURCE_TAR:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, min(n, first + PER_SOURCE_TAR)):
                base = i % len(faces)
                image = jittered(faces[base], i)
                digests[i] = int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little")
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="PNG", compress_level=1)
                key = f"face{i:08d}"
                add_member(tar, f"{key}.png", buf.getvalue())
                add_member(tar, f"{key}.cls", identities[base].encode())
    return {
        "base_faces": len(faces),
        "identities": len(set(identities)),
        "distinct_images": int(np.unique(digests).size),
    }


# ------------------------------------------------------------------------------------------------------ stage 3-4


def make_generator(folder: Path, label_map: dict[str, int]) -> Path:
    """The default config's G (width 16, 2 residual blocks), random weights: protect's mechanics need no training."""
    import torch

    from segue_dist.models.generator import GeneratorConfig, SegueGenerator
    from segue_dist.weights import export_generator

    torch.manual_seed(0)
    generator = SegueGenerator(GeneratorConfig(num_classes=len(label_map), width=16, num_res_blocks=2))
    return export_generator(generator, folder, label_map=label_map, label_source="cls")


def rank_command(generator: Path, split: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "segue_dist.protect", "--generator", str(generator), "--in", str(split)]
    cmd += ["--out", str(out), "--no-progress", "--device", "cpu"]
    return cmd + ["--workers", "1", "--encode-workers", "1", "--threads", "1"]


def start_ranks(generator: Path, split: Path, out: Path) -> list[subprocess.Popen]:
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = str(REPO)
        procs.append(
            subprocess.Popen(
                rank_command(generator, split, out),
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its own process group: a kill takes its loader workers with it
            )
        )
    return procs


def protect_ranks(
    generator: Path, split: Path, out: Path, sampler: RssSampler, kill_at: float | None
) -> dict[str, Any]:
    """Both ranks to the end; with ``kill_at`` (fraction of shards finished), rank 1 is SIGKILLed at that point."""
    shards = len(list(split.glob("*.tar")))
    procs = start_ranks(generator, split, out)
    killed: dict[str, Any] = {}
    start = time.perf_counter()
    while any(p.poll() is None for p in procs):
        for rank, proc in enumerate(procs):
            if proc.poll() is None:
                sampler.sample(f"rank{rank}", proc.pid)
        if kill_at is not None and not killed and procs[1].poll() is None:
            finished = len(list(out.glob("*._stats.json")))
            if finished >= kill_at * shards:
                os.killpg(procs[1].pid, signal.SIGKILL)
                procs[1].wait()
                killed = {
                    "rank": 1,
                    "at_s": round(time.perf_counter() - start, 1),
                    "shards_finished_at_kill": finished,
                    "temporary_files_left": len(list(out.glob(".*.tmp"))),
                }
        time.sleep(0.5)
    codes = []
    for rank, proc in enumerate(procs):
        _, err = proc.communicate()
        codes.append(proc.returncode)
        if proc.returncode != 0 and not (killed and rank == 1):
            raise RuntimeError(f"rank {rank} failed ({proc.returncode}): {err[-3000:]}")
    return {"seconds": time.perf_counter() - start, "exit_codes": codes, "killed": killed}


# ------------------------------------------------------------------------------------------------------- stage 5


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a tar, read with ``tarfile``; a key seen twice is kept under ``key#dup``."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            fields = samples.setdefault(key, {})
            if ext in fields:
                samples.setdefault(f"{key}#dup", {})[ext] = b""
                continue
            fields[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def check_shard(inp: Path, out: Path) -> dict[str, Any]:
    """One shard read back: its keys, duplicates, missing keys and the largest |written - original| of its PNGs."""
    originals = read_tar(inp)
    written = read_tar(out) if out.is_file() else {}
    duplicates = sum(k.endswith("#dup") for k in written)
    keys = {k for k in written if not k.endswith("#dup")}
    max_abs, not_png = 0, 0
    for key in keys:
        fields = written[key]
        if "png" not in fields or key not in originals:
            not_png += 1
            continue
        source = next(originals[key][e] for e in ("jpg", "jpeg", "png") if e in originals[key])
        a = np.asarray(Image.open(io.BytesIO(fields["png"])).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), dtype=np.int16)
        max_abs = max(max_abs, int(np.abs(a - b).max()))
    return {
        "keys": sorted(keys),
        "duplicates": duplicates,
        "missing": len(set(originals) - keys),
        "max_abs": max_abs,
        "not_png": not_png,
    }


def verify(split: Path, out: Path) -> dict[str, Any]:
    inputs = sorted(split.glob("*.tar"))
    seen: set[str] = set()
    duplicates = missing = max_abs = not_png = keys_out = 0
    with ProcessPoolExecutor(2) as pool:
        for result in pool.map(check_shard, inputs, [out / p.name for p in inputs]):
            keys_out += len(result["keys"])
            duplicates += result["duplicates"] + len(seen.intersection(result["keys"]))  # within and across shards
            seen.update(result["keys"])
            missing += result["missing"]
            max_abs = max(max_abs, result["max_abs"])
            not_png += result["not_png"]
    extra = sorted(p.name for p in out.glob("*.tar") if not (split / p.name).is_file())
    manifest = read_json(out / "_manifest.json") if (out / "_manifest.json").is_file() else {}
    return {
        "keys_out": keys_out,
        "duplicates": duplicates,
        "missing": missing,
        "unexpected_tars": extra,
        "max_abs_levels": max_abs,
        "not_png_or_unknown": not_png,
        "eps_bound_holds": not_png == 0 and max_abs <= EPS_LEVELS,
        "manifest_balanced": bool(manifest.get("balanced")),
        "manifest_samples_out": manifest.get("samples_out"),
        "manifest_quarantined": manifest.get("quarantined"),
    }


# ------------------------------------------------------------------------------------------------------- stage 6


KMEANS_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
from kmeans import make_data
from segue_dist.kmeans import KMeansConfig, fit_kmeans
n, d, k = {n}, 128, {k}
data = make_data(n, d, k, 0.05, 0.2, 0, "cpu")
x = data.x.numpy()
t = time.perf_counter()
res = fit_kmeans(x, KMeansConfig(k=k, niter=20, seed=0, backend="faiss", gpu="never"))
print(json.dumps({{"fit_s": time.perf_counter() - t, "iterations": res.iterations, "n_train": res.n_train,
                  "device": f"{{res.backend}}:{{res.device}}", "labels": int(len(res.labels))}}))
"""


def kmeans(n: int, k: int, sampler: RssSampler) -> dict[str, Any]:
    code = KMEANS_CHILD.format(repo=str(REPO), bench=str(REPO / "bench"), n=n, k=k)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None:
        sampler.sample("kmeans", proc.pid)
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return {"error": stderr.decode()[-2000:]}
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"n": n, "d": 128, "k": k, "seconds": round(time.perf_counter() - start, 1), **result}


# -------------------------------------------------------------------------------------------------------- main


def pipeline(work: Path, n: int, faces_root: Path, kill: bool) -> dict[str, Any]:
    """Stages 1-5 for ``n`` faces under ``work``; seconds per stage, what was read back, peak RSS per rank."""
    shutil.rmtree(work, ignore_errors=True)
    seconds: dict[str, float] = {}
    sampler = RssSampler()
    t = time.perf_counter()
    sources = generate_sources(work / "src", n, faces_root)
    seconds["generate"] = time.perf_counter() - t
    build = [sys.executable, "-m", "segue_dist.cli", "shards", "build", "--src", str(work / "src")]
    build += ["--out", str(work / "shards"), "--size", str(SIZE), "--samples-per-shard", str(per_shard(n))]
    seconds["shards_build"] = run_measured(build, sampler, "shards_build", {**os.environ, "PYTHONPATH": str(REPO)})
    split = work / "shards" / "train"
    labels = read_json(split / "labels.json")
    generator = make_generator(work / "generator", labels["labels"])
    out = work / "protected"
    first = protect_ranks(generator, split, out, sampler, kill_at=1 / 3 if kill else None)
    seconds["protect_killed" if kill else "protect"] = first["seconds"]
    rerun = None
    if kill:
        assert not (out / "_manifest.json").exists(), "the killed run must not have completed the set"
        rerun = protect_ranks(generator, split, out, sampler, kill_at=None)
        seconds["protect_rerun"] = rerun["seconds"]
    t = time.perf_counter()
    checked = verify(split, out)
    seconds["verify"] = time.perf_counter() - t
    return {
        "faces": n,
        "sources": sources,
        "shards": len(list(split.glob("*.tar"))),
        "first_run": {k: v for k, v in first.items() if k != "seconds"},
        "rerun_exit_codes": rerun["exit_codes"] if rerun else None,
        "checked": checked,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "peak_rss": sampler.peaks,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=10_000, help="faces of the RSS baseline run (0: none)")
    parser.add_argument("--kmeans-k", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/segue_corpus_rehearsal", help="scratch folder (removed first)")
    parser.add_argument("--out", default=str(RESULTS / "corpus_rehearsal.json"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    if args.faces >= 2**SIGNATURE_BITS:
        raise SystemExit(f"--faces must be below {2**SIGNATURE_BITS}")
    faces_root = Path(os.environ.get("SEGUE_FACES", REPO.parent / "shared" / "data"))
    work = Path(args.work)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_start": load_average(),
        "date": started,
    }
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            machine["cpu"] = line.split(":", 1)[1].strip()
            break
    baseline = pipeline(work / "baseline", args.baseline, faces_root, kill=False) if args.baseline else None
    main_run = pipeline(work / "main", args.faces, faces_root, kill=True)
    sampler = RssSampler()
    km = kmeans(args.faces, args.kmeans_k, sampler)
    km["peak_rss_mib"] = sampler.peaks.get("kmeans", {}).get("main_rss_mib")
    checked = main_run["checked"]
    seconds = dict(main_run["seconds"])
    if "seconds" in km:
        seconds["kmeans"] = km["seconds"]

    def rank_peak(run: dict[str, Any]) -> float:
        return max(run["peak_rss"].get(f"rank{r}", {}).get("main_rss_mib", 0.0) for r in (0, 1))

    peaks = {str(args.faces): rank_peak(main_run)}
    if baseline:
        peaks = {str(args.baseline): rank_peak(baseline), **peaks}
    result = {
        "faces": args.faces,
        "distinct_images": main_run["sources"]["distinct_images"],
        "ranks": 2,
        "killed_rank_and_reran": bool(main_run["first_run"]["killed"]) and main_run["rerun_exit_codes"] == [0, 0],
        "kill": main_run["first_run"]["killed"],
        "keys_out": checked["keys_out"],
        "duplicates": checked["duplicates"],
        "missing": checked["missing"],
        "eps_bound_holds": checked["eps_bound_holds"],
        "max_abs_levels": checked["max_abs_levels"],
        "manifest_balanced": checked["manifest_balanced"],
        "peak_rss_mib_per_rank": peaks,
        "seconds": seconds,
        "images_per_s": {k: round(args.faces / v, 1) for k, v in seconds.items() if v > 0 and k != "kmeans"},
        "kmeans": km,
        "main_run": main_run,
        "baseline_run": baseline,
        "size_px": SIZE,
        "per_rank": "1 loader worker, 1 encoder, 1 G thread (2 ranks on the machine's cores)",
        "machine": {**machine, "load_average_end": load_average()},
    }
    atomic_write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("main_run", "baseline_run")}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = result["killed_rank_and_reran"] and result["duplicates"] == 0 and result["missing"] == 0
    return 0 if ok and result["eps_bound_holds"] and result["keys_out"] == args.faces else 1


if __name__ == "__main__":
    sys.exit(main())
