"""`segue demo`: the whole path on the embedded synthetic corpus, as the README's main job.

    corpus -> shards -> [--unsupervised: pseudo-labels (extractor on other identities, K-means, quality)]
           -> train G (2 processes, or the GPUs present) -> protect -> evaluate (victims on clean vs protected,
              baselines, JPEG attacks, image quality) -> report

Each stage runs the same `segue` command a user would, and skips itself when its output is complete, so a rerun
after an interruption picks up where it stopped. `--unsupervised` trains the generator on the K-means
pseudo-labels instead of the true labels (the paper's unsupervised scenario).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from segue_dist.data.images import encode_jpeg
from segue_dist.utils.io import atomic_write_bytes, atomic_write_json
from segue_dist.utils.progress import console, print_table

REPO = Path(__file__).resolve().parents[1]


def write_demo_corpus(root: Path, identities: int, per_identity: int, size: int, seed: int) -> int:
    """Write the synthetic identity folders (JPEG, as real photo corpora are); returns the image count."""
    from segue_dist.data.synthetic import generate_corpus

    count = 0
    for name, index, image in generate_corpus(identities, per_identity, size, seed):
        path = root / name / f"{index:04d}.jpg"
        if not path.exists():
            atomic_write_bytes(path, encode_jpeg(np.asarray(image), quality=92))
        count += 1
    return count


def segue(*args: str, launcher: list[str] | None = None) -> None:
    """Run one `segue` stage as a user would (its own process, its own progress output); fail loudly."""
    cmd = [*(launcher or [sys.executable, "-m", "segue_dist.cli"]), *args]
    console.rule(f"[bold]{' '.join(args[:2])}")
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"segue demo: stage failed ({proc.returncode}): {' '.join(cmd)}")


def training_launcher(processes: int) -> list[str]:
    """accelerate launch with N processes: the GPUs when present, else N gloo processes on the CPU.

    (`accelerate launch --cpu --num_processes 2` silently starts one process, so CPU uses the MULTI_GPU config
    with use_cpu.)
    """
    import torch

    from segue_dist.site.local import free_port

    accelerate = str(Path(sys.executable).parent / "accelerate")
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        config, n = "multi_gpu.yaml", min(processes, gpus)
    elif gpus == 1:
        config, n = "single_gpu.yaml", 1
    else:
        config, n = "cpu_2proc.yaml", processes
    launch = [accelerate, "launch", "--config_file", str(REPO / "configs/accelerate" / config)]
    if n > 1:
        # A free port (the single-node configs say main_process_port: 0 as well): another run, or a stale one,
        # holding Accelerate's default 29500 would make it print "Port 29500 is already in use", read as an error.
        launch += ["--num_processes", str(n), "--main_process_port", str(free_port())]
    return [*launch, "-m", "segue_dist.train"]


def run_rows_in_parallel(experiment: Path, overrides: list[str], jobs: int, logs: Path) -> None:
    """Run each row of the sweep as its own `segue evaluate sweep --only <row>` process, ``jobs`` at a time.

    Victim training is the demo's longest stage and one victim uses one CPU core well; the sweep keeps one JSON per
    row, so the rows can be computed apart and the final sequential sweep only collects them. Each row's output
    goes to ``logs/<row>.log``; a failed row stops the demo with its log's tail.
    """
    from segue_dist.config import load_config
    from segue_dist.evaluate.config import SweepConfig
    from segue_dist.evaluate.sweep import plan_rows

    names = [row.name for row in plan_rows(load_config(SweepConfig, experiment, overrides))]
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    console.rule(f"[bold]evaluate: {len(names)} rows, {jobs} at a time (logs: {logs})")
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "segue_dist.cli", "evaluate", "sweep", "--config", str(experiment),
                   "--only", name, *overrides]  # fmt: skip
            log = (logs / f"{name}.log").open("w")
            running.append((name, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1.0)
        for item in [r for r in running if r[1].poll() is not None]:
            name, proc, log = item
            log.close()
            running.remove(item)
            if proc.returncode != 0:
                for _, other, _ in running:
                    other.kill()
                tail = (logs / f"{name}.log").read_text()[-2000:]
                raise SystemExit(f"segue demo: evaluation row {name} failed ({proc.returncode}):\n{tail}")
            console.print(f"row {name} done")


def done(path: Path) -> bool:
    return path.exists()


def run_pipeline(args: argparse.Namespace) -> dict[str, float]:
    out = Path(args.out)
    shards, timings = out / "shards", {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0

    def stage_shards() -> None:
        n = write_demo_corpus(out / "corpus", args.identities, args.per_identity, args.size, args.seed)
        console.print(f"demo corpus: {args.identities} identities x {args.per_identity} images, {args.size} px ({n})")
        segue("shards", "build", "--src", str(out / "corpus"), "--out", str(shards),
              "--test-per-identity", str(args.test_per_identity), "--samples-per-shard", str(args.samples_per_shard),
              "--seed", str(args.seed), "--workers", "1")  # fmt: skip

    def stage_pseudo_labels() -> None:
        from segue_dist.models.face_dlib import dlib_available

        extractor = "dlib"
        if dlib_available():
            # The pretrained dlib descriptor, as on real faces. The cartoons are not photos: dlib finds few faces
            # and embeds the centred crop of the rest, which clusters them no worse than the extractor trained
            # below, and without training it (docs/measurements.md).
            console.print("pseudo-labels: dlib face descriptor (the cartoons are not photos: expect few detections)")
        else:
            # Other people (a different seed draws different looks) train the feature extractor: the paper's
            # CelebA-trained model, i.e. identities disjoint from the ones being protected.
            extractor = str(out / "extractor")
            write_demo_corpus(
                out / "corpus_others", args.identities * 2, args.per_identity // 2, args.size, args.seed + 1
            )
            segue("shards", "build", "--src", str(out / "corpus_others"), "--out", str(out / "shards_others"),
                  "--samples-per-shard", str(args.samples_per_shard), "--workers", "1")  # fmt: skip
            if not done(out / "extractor" / "extractor.json"):
                segue("cluster", "fit-extractor", "--shards", str(out / "shards_others" / "train"),
                      "--out", extractor, "--size", str(args.size), "--epochs", str(args.extractor_epochs), "--workers", "1",
                      "--small-stem", "off")  # fmt: skip
        if not done(out / "pseudo" / "pseudo_labels.json"):
            segue("cluster", "--shards", str(shards / "train"), "--k", str(args.identities),
                  "--extractor", extractor, "--out", str(out / "pseudo"), "--workers", "1")  # fmt: skip

    def stage_train() -> None:
        if done(out / "generator" / "generator.json"):
            return
        labels = [f"data.labels={out / 'pseudo' / 'pseudo_labels.json'}"] if args.unsupervised else []
        segue("--config", str(REPO / "configs/train/demo.yaml"), f"out={out / 'generator'}",
              f"data.train={shards / 'train'}", f"data.image_size=[{args.size}]", f"epochs={args.epochs}", *labels,
              launcher=training_launcher(args.processes))  # fmt: skip

    def stage_protect() -> None:
        if not done(out / "protected" / "train" / "_manifest.json"):
            segue("protect", "--generator", str(out / "generator" / "generator.safetensors"),
                  "--in", str(shards / "train"), "--out", str(out / "protected" / "train"))  # fmt: skip

    def stage_evaluate() -> None:
        # The experiment config names runs/demo; point it at this --out.
        config = "demo_full.yaml" if args.full else "demo.yaml"
        text = (REPO / "configs/experiments" / config).read_text().replace("runs/demo", str(out))
        experiment = out / "experiment.yaml"
        atomic_write_bytes(experiment, text.encode("utf-8"))
        overrides = [f"train.size={args.size}", *([f"train.epochs={args.victim_epochs}"] if args.victim_epochs else [])]
        if args.jobs > 1:  # rows in parallel, one thread each; the final sweep below finds them all done
            run_rows_in_parallel(experiment, overrides, args.jobs, out / "eval" / "logs")
        segue("evaluate", "sweep", "--config", str(experiment), *overrides)

    def stage_report() -> None:
        segue("report", "--results", str(out / "eval"), "--out", str(out / "report"))

    # The supervised run trains on the true labels: it needs no extractor and no K-means.
    pseudo_labels = [("pseudo-labels", stage_pseudo_labels)] if args.unsupervised else []
    for name, fn in (
        ("shards", stage_shards),
        *pseudo_labels,
        ("train", stage_train),
        ("protect", stage_protect),
        ("evaluate", stage_evaluate),
        ("report", stage_report),
    ):
        timed(name, fn)
    return timings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where the demo writes everything")
    parser.add_argument("--identities", type=int, default=10)
    parser.add_argument("--per-identity", type=int, default=200)
    parser.add_argument("--test-per-identity", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=12, help="generator epochs (Algorithm 1, joint schedule)")
    parser.add_argument("--extractor-epochs", type=int, default=8, help="feature extractor epochs")
    parser.add_argument("--victim-epochs", type=int, default=0, help="victim epochs (0 = the experiment config's)")
    parser.add_argument("--processes", type=int, default=2, help="training processes (gloo on CPU)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="evaluation rows at a time")
    parser.add_argument("--full", action="store_true", help="evaluate LSP and random noise too, under more attacks")
    parser.add_argument("--unsupervised", action="store_true", help="train G on K-means pseudo-labels")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--seed", type=int, default=0)


def write_summary(path: Path, timings: dict[str, float]) -> None:
    """This run's seconds per stage and what they ran on (the CPU kind torch dispatched to), as JSON."""
    import torch

    summary = {
        "seconds": {name: round(s, 1) for name, s in timings.items()},
        "total_s": round(sum(timings.values()), 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    atomic_write_json(path, summary)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    timings = run_pipeline(args)
    write_summary(out / "demo_summary.json", timings)
    print_table("segue demo", ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])
    console.print(f"report: {out / 'report' / 'report.md'} (and report.html)")
    return 0
