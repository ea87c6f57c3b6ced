"""Protection at identity scale: hundreds of identities, K-means pseudo-labels, identities G never saw, and a G
trained on one face source applied to another (the paper's Table II and its "once-trained, multiple-use" claim).

    python bench/identities.py prepare                      # the 64 px shard sets below, from $SEGUE_FACES
    OMP_NUM_THREADS=1 python bench/identities.py run --rows lfw423_true,new_identities --attacks none,grayscale
    python bench/identities.py summary

Every G is the default recipe (`configs/train/default.yaml`, one process, trained by `segue train` in this
interpreter, once per generator and reused by every row that names it). A row protects a shard set's training split
with that G, trains a ResNet-18 victim on it (the attacker's true identity labels, 8 epochs, `bench/protection.py`'s
victim) and tests it on the clean test split; the clean victim under the same attack and seed is its control.

Rows (``ROWS``): ``lfw158_true`` / ``lfw423_true`` (true labels as side information), ``lfw423_pseudo`` (G trained
and applied with dlib + K-means pseudo-labels, K = 423 given; ``lfw423_pseudo_estk``: K chosen by silhouette),
``new_identities`` (G from LFW-62 applied to the other 361 lfw423 identities, their labels numbered after G's 62),
``lfw_to_glint24`` and ``glint24_to_lfw`` (cross-source, labels numbered after G's).

Results: ``bench/results/identities/<row>.json`` (per attack: clean and protected accuracy; chance; the protected
set's PSNR / SSIM / δ statistics; clustering quality for pseudo-label rows; G's training time) and ``summary.json``
= ``{"rows": {row: {"clean", "segue", "chance", "identities", "ratio_to_clean", "x_chance"}}}`` (no-attack row,
percent), rewritten after every row. Clean victims are cached per shard set, attack and seed under
``bench/results/identities/clean/``. Use one thread per job and at most two jobs at once on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from protection import ATTACKS, apply_generator, image_quality, load_split, train_generator, victim_row  # noqa: E402

from segue_dist.data.sidecar import read_sidecar  # noqa: E402
from segue_dist.utils.io import atomic_write_json, read_json  # noqa: E402
from segue_dist.utils.progress import console, print_table  # noqa: E402

# Shard set -> (folder under $SEGUE_FACES, `segue shards build` selection flags); all at 64 px.
SETS: dict[str, tuple[str, list[str]]] = {
    "lfw423_64": ("lfw423", ["--min-per-identity", "5", "--max-per-identity", "20", "--test-per-identity", "2"]),
    "lfw158_64": ("lfw423", ["--min-per-identity", "10", "--max-per-identity", "30", "--test-per-identity", "3"]),
    "lfw62_64": ("lfw423", ["--min-per-identity", "20", "--max-per-identity", "50", "--test-per-identity", "5"]),
    "lfw361_64": ("lfw423", ["--below-per-identity", "20", "--test-per-identity", "2"]),
    "glint24_64": ("glint24", ["--test-per-identity", "10"]),
}
SIZE = 64


@dataclass(frozen=True)
class Generator:
    """A G to train: the shard set it learns from and its side information (true labels or pseudo-labels)."""

    shards: str
    labels: str = "true"  # true | pseudo (K-means, K = the true identity count) | pseudo_estk (K by silhouette)


@dataclass(frozen=True)
class Row:
    """One measurement: which G protects which shard set, with which side information."""

    generator: str
    target: str
    new_labels: bool = False  # number the target's identities after G's training classes (people G never saw)


GENERATORS = {
    "lfw158_true": Generator("lfw158_64"),
    "lfw423_true": Generator("lfw423_64"),
    "lfw423_pseudo": Generator("lfw423_64", "pseudo"),
    "lfw423_pseudo_estk": Generator("lfw423_64", "pseudo_estk"),
    "lfw62_true": Generator("lfw62_64"),
    "glint24_true": Generator("glint24_64"),
}
ROWS = {
    "lfw158_true": Row("lfw158_true", "lfw158_64"),
    "lfw423_true": Row("lfw423_true", "lfw423_64"),
    "lfw423_pseudo": Row("lfw423_pseudo", "lfw423_64"),
    "lfw423_pseudo_estk": Row("lfw423_pseudo_estk", "lfw423_64"),
    "new_identities": Row("lfw62_true", "lfw361_64", new_labels=True),
    "lfw_to_glint24": Row("lfw62_true", "glint24_64", new_labels=True),
    "glint24_to_lfw": Row("glint24_true", "lfw62_64", new_labels=True),
}
# K-means range for the estimated-K row: around lfw423's 423, as a user with a rough idea of the count would give.
ESTIMATE_K = "300:550"


def segue(*args: str) -> None:
    """Run one `segue` command as a user would; a failure stops the bench with its exit status."""
    cmd = [sys.executable, "-m", "segue_dist.cli", *args]
    console.print(f"[dim]$ segue {' '.join(args)}[/]")
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def prepare(args: argparse.Namespace) -> None:
    """Build every shard set of ``SETS`` that is missing (`segue shards build`, resumable)."""
    for name, (source, flags) in SETS.items():
        if (args.shards / name / "dataset.json").exists():
            continue
        src = args.faces / source
        if not src.is_dir():
            raise SystemExit(f"{src}: face folder not found; pass --faces or set SEGUE_FACES")
        segue("shards", "build", "--src", str(src), "--out", str(args.shards / name), "--size", str(SIZE), *flags)


# ------------------------------------------------------------------------------------------------ side information


def pseudo_labels(args: argparse.Namespace, shards: str, mode: str) -> tuple[Path, dict[str, Any]]:
    """`segue cluster` (dlib descriptor + K-means) over a training split; returns the sidecar and cluster summary."""
    out = args.work / "cluster" / f"{shards}_{mode}"
    sidecar = out / "pseudo_labels.json"
    if not sidecar.exists():
        split = args.shards / shards / "train"
        k = ["--k", str(read_json(args.shards / shards / "dataset.json")["identities"])]
        how = k if mode == "pseudo" else ["--estimate-k", ESTIMATE_K]
        segue(
            "cluster", "--shards", str(split), *how, "--extractor", "dlib", "--out", str(out), "--seed", str(args.seed)
        )
    return sidecar, read_json(out / "cluster_summary.json")


def side_information(keys: list[str], sidecar: Path) -> torch.Tensor:
    """The pseudo-label of every key, in the order given (N,) int64; a key the sidecar lacks is an error."""
    mapping, _ = read_sidecar(sidecar)
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise SystemExit(f"{sidecar}: no pseudo-label for {len(missing)} keys, e.g. {missing[0]!r}")
    return torch.tensor([mapping[k] for k in keys], dtype=torch.long)


def trained_generator(args: argparse.Namespace, name: str, record: dict[str, Any]) -> tuple[Path, int, Path | None]:
    """Train (or reuse) generator ``name``; returns its path, its number of training classes and its pseudo-label
    sidecar (None for true labels). ``record`` receives G's training time and history and the clustering quality."""
    spec = GENERATORS[name]
    overrides = list(args.train_set)
    sidecar = None
    if spec.labels != "true":
        sidecar, summary = pseudo_labels(args, spec.shards, spec.labels)
        overrides.append(f"data.labels={sidecar}")
        record["clustering"] = {"k": summary["k"], **summary.get("quality", {})}
    out = args.work / name / f"seed{args.seed}"
    extra: dict[str, Any] = {}
    path = train_generator(
        args.shards / spec.shards / "train", out, args.seed, SIZE, args.train_config, overrides, extra
    )
    record["generator"] = {
        "name": name,
        "trained_on": spec.shards,
        "side_information": spec.labels,
        "train_overrides": args.train_set,
        **extra,
    }
    return path, int(read_json(path.with_suffix(".json"))["generator"]["num_classes"]), sidecar


# ---------------------------------------------------------------------------------------------------------- victims


def victim(args: argparse.Namespace, shards: str, images: torch.Tensor, labels: torch.Tensor, attack: str) -> float:
    """Clean-test accuracy (percent) of a ResNet-18 trained on ``images`` with true ``labels`` under ``attack``."""
    ns = SimpleNamespace(shards=args.shards / shards, victim_epochs=args.victim_epochs, seed=args.seed)
    num_classes = int(read_json(args.shards / shards / "dataset.json")["identities"])
    return float(victim_row(images, labels, num_classes, attack, ns)["acc"])


def clean_victim(args: argparse.Namespace, shards: str, train_set: Any, attack: str) -> float:
    """The unprotected control, cached per shard set, attack, seed and victim epochs (shared by every row)."""
    path = args.out / "clean" / f"{shards}.json"
    cache = read_json(path) if path.exists() else {}
    key = f"{attack}/seed{args.seed}/e{args.victim_epochs}"
    if key not in cache:
        cache[key] = victim(args, shards, train_set.images, train_set.labels, attack)
        atomic_write_json(path, {**(read_json(path) if path.exists() else {}), key: cache[key]})
    return float(cache[key])


# -------------------------------------------------------------------------------------------------------------- rows


def run_row(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Protect a row's target training split with its G and attack it with every requested attack."""
    row = ROWS[name]
    path = args.out / f"{name}.json"
    record: dict[str, Any] = read_json(path) if path.exists() else {"row": name, "attacks": {}}
    gen_path, g_classes, sidecar = trained_generator(args, row.generator, record)
    train_set = load_split(args.shards / row.target, "train")
    k = train_set.num_classes
    if row.new_labels:  # people G never saw: codes after its training classes
        side = train_set.labels + g_classes
    elif sidecar is not None:  # G is applied with the side information it was trained with
        side = side_information(train_set.keys, sidecar)
    else:
        side = train_set.labels
    protected = apply_generator(gen_path, train_set.images, side, args.eps)
    record.update(
        target=row.target,
        identities=k,
        train_images=len(train_set.labels),
        chance=round(100 / k, 3),
        side_labels=[int(side.min()), int(side.max())],
        quality=image_quality(train_set.images, protected, train_set.labels),
        env={"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    )
    for attack in args.attacks.split(","):
        done = record["attacks"].get(attack, {})
        if args.keep and {"clean", "segue"} <= done.keys():
            continue
        t0 = time.perf_counter()
        cell = {
            "clean": clean_victim(args, row.target, train_set, attack),
            "segue": victim(args, row.target, protected, train_set.labels, attack),
        }
        record["attacks"][attack] = {**cell, "seconds": round(time.perf_counter() - t0, 1)}
        console.print(f"{name:>18} {attack:>10}: segue {cell['segue']:5.1f}%  clean {cell['clean']:5.1f}%")
        atomic_write_json(path, record)
    atomic_write_json(path, record)
    write_summary(args.out)
    return record


def write_summary(out: Path) -> dict[str, Any]:
    """summary.json from every row JSON under ``out``: the no-attack cell, chance and ratios (percent)."""
    rows: dict[str, Any] = {}
    for name in ROWS:
        path = out / f"{name}.json"
        rec = read_json(path) if path.exists() else {}
        if "none" not in rec.get("attacks", {}):
            continue
        cell = rec["attacks"]["none"]
        rows[name] = {
            "clean": round(cell["clean"], 2),
            "segue": round(cell["segue"], 2),
            "chance": rec["chance"],
            "identities": rec["identities"],
            "ratio_to_clean": round(cell["segue"] / max(cell["clean"], 1e-9), 3),
            "x_chance": round(cell["segue"] / rec["chance"], 2),
            "attacks": {
                a: {"clean": round(c["clean"], 2), "segue": round(c["segue"], 2)} for a, c in rec["attacks"].items()
            },
        }
        if "clustering" in rec:
            rows[name]["clustering"] = rec["clustering"]
    summary = {"rows": rows}
    atomic_write_json(out / "summary.json", summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    table = [
        [
            name,
            r["identities"],
            f"{r['clean']:.1f}",
            f"{r['segue']:.1f}",
            f"{r['chance']:.2f}",
            f"{r['ratio_to_clean']:.2f}",
        ]
        for name, r in summary["rows"].items()
    ]
    print_table(
        "identity-scale protection (no attack)", ["row", "K", "clean %", "Segue %", "chance %", "Segue / clean"], table
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cmd", choices=["prepare", "run", "summary"])
    p.add_argument("--faces", type=Path, default=Path(os.environ.get("SEGUE_FACES", REPO.parent / "shared/data")))
    p.add_argument("--shards", type=Path, default=REPO / "shards")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--attacks", default="none", help=f"comma-separated, of: {', '.join(ATTACKS)}")
    p.add_argument("--seed", type=int, default=0, help="G's training seed and the victims'")
    p.add_argument("--victim-epochs", type=int, default=8)
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--train-config", default=str(REPO / "configs/train/default.yaml"))
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="override for every G")
    p.add_argument("--work", type=Path, default=REPO / "runs/identities")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/identities")
    p.add_argument("--keep", action="store_true", help="skip attack cells already in a row's JSON")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args)
        return
    if args.cmd == "run":
        unknown = set(args.rows.split(",")) - set(ROWS) or set(args.attacks.split(",")) - set(ATTACKS)
        if unknown:
            raise SystemExit(f"unknown row or attack: {', '.join(sorted(unknown))}")
        for name in args.rows.split(","):
            run_row(args, name)
    print_summary(write_summary(args.out))


if __name__ == "__main__":
    main()
