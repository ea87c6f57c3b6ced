"""End-to-end effectiveness run on one shard set: train G, protect, attack with victims, report.

    python bench/effectiveness.py --name glint24 --shards shards/glint24_64 --size 64 --out runs/effect/glint24
    python bench/effectiveness.py ... --attacks full --victims resnet18,mobilenet_v2   (robustness / victim sweep)

Every step is the `segue` command a user would run (train, protect, evaluate sweep, report); results land in
<out>/eval/results.json and <out>/report/. Steps whose output exists are skipped, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

ATTACK_CATALOGUE = {
    "none": {"name": "none"},
    "jpeg10": {"name": "jpeg10", "jpeg_quality": 10},
    "grayscale": {"name": "grayscale", "grayscale": True},
    "iss": {"name": "iss", "iss": True},
    "half_res": {"name": "half_res", "scale": 0.5},
    "quarter_res": {"name": "quarter_res", "scale": 0.25},
    "adv4": {"name": "adv4", "adv_rho": 4 / 255},
    "cutout": {"name": "cutout", "augment": "cutout"},
    "mixup": {"name": "mixup", "augment": "mixup"},
    "cutmix": {"name": "cutmix", "augment": "cutmix"},
    "blur": {"name": "blur", "augment": "blur"},
}
PRESETS = {
    "full": list(ATTACK_CATALOGUE),
    "robust": ["none", "jpeg10", "grayscale", "iss", "half_res", "quarter_res", "adv4"],
}


def attacks_from(spec: str) -> list[dict]:
    """A preset (full, robust) or a comma list of catalogue names (none,jpeg10,...)."""
    names = PRESETS.get(spec, spec.split(","))
    unknown = [n for n in names if n not in ATTACK_CATALOGUE]
    if unknown:
        raise SystemExit(f"--attacks: unknown {unknown}; choose from {sorted(ATTACK_CATALOGUE)} or {sorted(PRESETS)}")
    return [ATTACK_CATALOGUE[n] for n in names]


def segue(*args: str) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "segue_dist.cli", *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--shards", required=True, help="a shard set with train/ and test/")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--gen-epochs", type=int, default=20)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--victim-epochs", type=int, default=30)
    p.add_argument("--victims", default="resnet18")
    p.add_argument("--attacks", default="none", help="preset (full, robust) or comma list (none,jpeg10,half_res)")
    p.add_argument("--methods", default="lsp,random", help="baselines beside clean and segue (ue, lsp, random)")
    p.add_argument("--ue-rounds", type=int, default=10, help="UE min-min rounds (each: surrogate steps + PGD pass)")
    p.add_argument("--labels", default="", help="pseudo-label sidecar (unsupervised Segue)")
    p.add_argument("--generator", default="", help="use this generator instead of training one (cross-dataset)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `segue train` override, repeatable (e.g. distortion.jpeg=false)")  # fmt: skip
    p.add_argument(
        "--small-stem",
        default="auto",
        choices=["auto", "on", "off"],
        help="small-image stem for surrogate and victims (auto = on at <= 112 px; off is ~10x cheaper on CPU)",
    )
    args = p.parse_args()

    out, shards = Path(args.out), Path(args.shards)
    timings: dict[str, float] = {}
    generator = Path(args.generator) if args.generator else out / "generator" / "generator.safetensors"
    if not generator.exists():
        extra = [f"data.labels={args.labels}"] if args.labels else []
        extra += args.train_set
        if args.small_stem != "auto":
            extra.append(f"surrogate.small_stem={'true' if args.small_stem == 'on' else 'false'}")
        timings["train_s"] = segue(
            "train", "--config", str(REPO / "configs/train/default.yaml"), f"out={out / 'generator'}",
            f"data.train={shards / 'train'}", f"data.image_size=[{args.size}]", f"data.batch_size={args.gen_batch}",
            f"data.num_workers={args.workers}", f"epochs={args.gen_epochs}", "tensorboard=false", *extra,
        )  # fmt: skip
    protected = out / "protected" / "train"
    if not (protected / "_manifest.json").exists():
        timings["protect_s"] = segue("protect", "--generator", str(generator), "--in", str(shards / "train"),
                                     "--out", str(protected))  # fmt: skip
    # No time_s: the report reads the protect job's own shard seconds and where G ran from the output folder.
    methods = [{"name": "clean"}, {"name": "segue", "train": str(protected), "source": f"generator {generator}"}]
    for method in filter(None, args.methods.split(",")):
        entry = {"name": method, "baseline": method}
        if method == "ue":
            entry["options"] = {"max_rounds": args.ue_rounds}
        methods.append(entry)
    sweep = {
        "name": args.name,
        "out": str(out / "eval"),
        "data": {"dataset": args.name, "clean_train": str(shards / "train"), "test": str(shards / "test")},
        "methods": methods,
        "victims": args.victims.split(","),
        "attacks": attacks_from(args.attacks),
        "train": {"size": args.size, "epochs": args.victim_epochs, "batch_size": 128, "workers": args.workers}
        | ({} if args.small_stem == "auto" else {"small_stem": args.small_stem == "on"}),
        "quality": True,
    }
    config = out / "sweep.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(sweep, sort_keys=False))
    timings["evaluate_s"] = segue("evaluate", "sweep", "--config", str(config))
    segue("report", "--results", str(out / "eval"), "--out", str(out / "report"))
    print({k: round(v, 1) for k, v in timings.items()})


if __name__ == "__main__":
    main()
