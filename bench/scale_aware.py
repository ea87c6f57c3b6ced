"""Scale-aware protection of full-size photos (issue 13, item 2): does a G trained at 64 px protect the 250x250 LFW
originals once the attacker resizes them to the size it trains at?

    python bench/scale_aware.py --generator runs/lfw62_true/generator.safetensors --shards shards/lfw62

Inputs: the README's LFW-62 run (``segue shards build ... --size 64`` and the 64 px training of G). The train/test
split is read from those shards (each sample's JSON names its source photo), so the originals, the victims' test
faces and the README's own rows are the same photos.

Steps, each the `segue` command a user runs (skipped when its output is complete, so a rerun resumes):

1. copy the split's original 250x250 JPEGs out of ``$SEGUE_FACES/lfw423`` into ``<work>/originals/{train,test}``
   (outside the repository);
2. ``segue protect`` the training originals in folder mode, twice: ``face_scale`` (δ computed at G's training size,
   64 px short side, and upsampled: the default) and ``full_size`` (``--face-size 4096``: G run on the 250 px photo
   itself, the naive way, which draws its pattern at 4x the scale G learnt);
3. the attacker's pipeline: ``segue shards build --size S`` of each training folder (clean, face_scale, full_size)
   and of the clean test originals, for every S in ``--sizes`` (default 112 and 64: resize short side, centre crop);
4. victims: ResNet-18 from scratch on each training set at its size, tested on the clean test faces
   (``segue evaluate sweep``, one row per process, ``--jobs`` at a time, one thread each).

Result: ``bench/results/protection/scale_aware/lfw62.json`` (accuracy per size x method x attack, chance, the
protect manifests' ε / PSNR, the generator's SHA-256, timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segue_dist.demo import run_rows_in_parallel  # noqa: E402
from segue_dist.protect import FOLDER_MANIFEST  # noqa: E402
from segue_dist.utils.io import atomic_write_json, read_json  # noqa: E402
from segue_dist.utils.progress import console, print_table  # noqa: E402
from segue_dist.weights import file_sha256  # noqa: E402

# Folder-mode variants: name -> `segue protect` flags. 4096 px is above any LFW photo, so G runs at the photo's size.
VARIANTS = {"face_scale": [], "full_size": ["--face-size", "4096"]}


def segue(*args: str) -> None:
    """Run one `segue` command as a user would (one intra-op thread: the victims run beside it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "segue_dist.cli", *args]
    console.print(f"[dim]$ segue {' '.join(args)}[/]")
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def shard_sources(split_dir: Path) -> list[str]:
    """Source paths (relative to the corpus root) of every sample in a shard split, from each sample's JSON."""
    sources = []
    for tar in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.name.endswith(".json"):
                    sources.append(json.loads(tf.extractfile(member).read())["source"])  # type: ignore[union-attr]
    return sorted(sources)


def copy_originals(shards: Path, corpus: Path, originals: Path) -> dict[str, int]:
    """``<originals>/<split>/<identity>/<file>`` for the shards' train and test samples; returns counts per split."""
    counts = {}
    for split in ("train", "test"):
        sources = shard_sources(shards / split)
        for rel in sources:
            dst = originals / split / rel
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(corpus / rel, dst)
        counts[split] = len(sources)
    return counts


def upscale_originals(originals: Path, size: int) -> Path:
    """``<originals>_<size>px``: every original resized (bicubic) to ``size`` x ``size`` and stored as JPEG q95: the
    LFW faces as the high-resolution photos a platform holds, where G run at full size paints its pattern at
    ``size / 64`` times the scale it learnt."""
    out = originals.with_name(f"{originals.name}_{size}px")
    for src in sorted(originals.rglob("*.jpg")):
        dst = out / src.relative_to(originals)
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as img:
                img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(dst, format="JPEG", quality=95)
    return out


def build_attack_shards(src: Path, out: Path, size: int) -> None:
    """The attacker's resize: every photo of ``src`` (identity folders) into one train split at ``size`` px."""
    if not (out / "train" / "sizes.json").is_file():
        segue("shards", "build", "--src", str(src), "--out", str(out), "--size", str(size),
              "--min-per-identity", "1", "--test-per-identity", "0", "--samples-per-shard", "200")  # fmt: skip


def sweep_config(work: Path, size: int, train_sets: dict[str, Path], args: argparse.Namespace) -> Path:
    """One sweep per attacker size: every training set x ResNet-18 x the attacks, tested on clean faces."""
    attack_rows = {
        "none": {"name": "none"},
        "jpeg10": {"name": "jpeg10", "jpeg_quality": 10},
        "grayscale": {"name": "grayscale", "grayscale": True},
        "iss": {"name": "iss", "iss": True},
    }
    cfg = {
        "name": f"scale_aware_{size}",
        "out": str(work / "eval" / f"size{size}"),
        "seed": args.seed,
        "data": {
            "dataset": "lfw62",
            "clean_train": str(train_sets["clean"]),
            "test": str(work / f"attack/test_{size}/train"),
        },
        "methods": [{"name": n} if n == "clean" else {"name": n, "train": str(p)} for n, p in train_sets.items()],
        "victims": ["resnet18"],
        "attacks": [attack_rows[a] for a in args.attacks],
        "train": {"size": size, "epochs": args.epochs, "batch_size": 64, "optimizer": "adam", "small_stem": False},
        "quality": False,
    }
    path = work / f"sweep_{size}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def manifest_stats(out_dir: Path) -> dict[str, Any]:
    """ε and quality of a folder-mode output, from its manifest and journal (decoded from the written files)."""
    manifest = read_json(out_dir / FOLDER_MANIFEST)
    keep = ("photos", "written", "quarantined", "ignored", "balanced", "measured_max_abs", "formats")
    return {k: manifest[k] for k in keep if k in manifest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="runs/lfw62_true/generator.safetensors")
    p.add_argument("--shards", default="shards/lfw62", help="the README's LFW-62 shards (train/test split)")
    p.add_argument("--faces", default=os.environ.get("SEGUE_FACES", str(REPO.parent / "shared" / "data")))
    p.add_argument("--shard-protected", default="runs/lfw62_true/protected/train",
                   help="the README's protected 64 px shards: the reference row at 64 px ('' = leave out)")  # fmt: skip
    p.add_argument("--work", default="runs/scale_aware")
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 64])
    p.add_argument("--attacks", nargs="+", default=["none"], choices=["none", "jpeg10", "grayscale", "iss"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--upscale", type=int, default=0, help="protect the originals upscaled to N x N px (0 = as they are)"
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench/results/protection/scale_aware/lfw62.json"))
    args = p.parse_args()

    work, t0, timings = Path(args.work).resolve(), time.perf_counter(), {}
    corpus = Path(args.faces) / "lfw423"
    if not corpus.is_dir():
        raise SystemExit(f"scale_aware: no LFW corpus at {corpus} (set --faces or SEGUE_FACES)")
    counts = copy_originals(Path(args.shards), corpus, work / "originals")
    originals = {split: work / "originals" / split for split in ("train", "test")}
    if args.upscale:
        originals = {split: upscale_originals(path, args.upscale) for split, path in originals.items()}
    timings["originals_s"] = time.perf_counter() - t0

    protected = {}
    for name in args.variants:
        flags = VARIANTS[name]
        out = work / "protected" / name
        t = time.perf_counter()
        if not (out / FOLDER_MANIFEST).is_file():
            segue("protect", "--generator", args.generator, "--in", str(originals["train"]), "--out", str(out),
                  "--no-progress", *flags)  # fmt: skip
        timings[f"protect_{name}_s"] = time.perf_counter() - t
        protected[name] = out

    results: dict[str, Any] = {}
    train_seconds: dict[str, Any] = {}
    for size in args.sizes:
        build_attack_shards(originals["test"], work / f"attack/test_{size}", size)
        train_sets = {"clean": work / f"attack/clean_{size}/train"}
        build_attack_shards(originals["train"], work / f"attack/clean_{size}", size)
        for name, folder in protected.items():
            build_attack_shards(folder, work / f"attack/{name}_{size}", size)
            train_sets[name] = work / f"attack/{name}_{size}/train"
        if args.shard_protected and Path(args.shard_protected).is_dir() and size == 64:
            train_sets["shards_64px"] = Path(args.shard_protected).resolve()
        experiment = sweep_config(work, size, train_sets, args)
        t = time.perf_counter()
        run_rows_in_parallel(experiment, [], args.jobs, work / "eval" / f"size{size}" / "logs")
        segue("evaluate", "sweep", "--config", str(experiment))  # collects the rows' JSONs into results.json
        timings[f"victims_{size}_s"] = time.perf_counter() - t
        sweep = read_json(work / "eval" / f"size{size}" / "results.json")
        results[str(size)] = {f"{r['tags']['method']}/{r['tags']['attack']}": r["final_acc"] for r in sweep["rows"]}
        results[str(size)]["chance"] = sweep["rows"][0]["chance"]
        train_seconds[str(size)] = {
            f"{r['tags']['method']}/{r['tags']['attack']}": r["train_seconds"] for r in sweep["rows"]
        }

    report = {
        "kind": "scale_aware_protection",
        "question": "does a G trained at 64 px protect 250x250 originals after the attacker's resize to S px?",
        "generator": args.generator,
        "generator_sha256": file_sha256(Path(args.generator)),
        "data": {"shards": args.shards, "photos": counts, "original_size": [args.upscale or 250] * 2},
        "variants": {
            "face_scale": "folder mode default: δ at G's training size (64 px short side), upsampled bilinearly",
            "full_size": f"--face-size 4096: G run on the {args.upscale or 250} px photo itself (the naive way)",
            "shards_64px": "the README's shard mode: G on the 64 px training shards (G's own setting; reference)",
        },
        "protect": {name: manifest_stats(out) for name, out in protected.items()},
        "victim": {"arch": "resnet18", "epochs": args.epochs, "optimizer": "adam", "small_stem": False},
        "accuracy_pct": results,
        "victim_train_s": train_seconds,  # each row's own training time (one thread, two rows at once)
        "this_invocation_s": {k: round(v, 1) for k, v in timings.items()},  # what was not already done (resume)
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), report)
    columns = list(dict.fromkeys(key for accs in results.values() for key in accs))
    rows = [[size, *(f"{accs[c]:.1f}" if c in accs else "-" for c in columns)] for size, accs in results.items()]
    print_table("scale-aware protection: clean-test accuracy (%)", ["size", *columns], rows)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
