"""Protection ablation: which perturbation stays unlearnable after the attacker's pipeline.

One variant = one way of making the protected training set (a Segue generator trained with `segue train` under
some overrides, or a fixed pattern family used as a probe). Each variant's protected set is attacked by every row
of the attacker catalogue (JPEG-10, grayscale, ISS, half resolution, Cutout, adversarial training ρ_a = 2/255, ...):
a ResNet-18 victim is trained on the (attacked) protected set and tested on clean faces. The clean set and LSP are
measured under the same rows.

    python bench/protection.py run --name clean --method clean --seeds 0,1,2
    python bench/protection.py run --name lsp --method lsp --seeds 0,1,2
    python bench/protection.py run --name gray --method segue --seeds 0,1,2 --train-set distortion.grayscale_p=0.5
    python bench/protection.py summary --default gray

A seed is the training seed of G (``seed=N``), of LSP's patterns and of the victim: every cell is the mean over
the seeds run, with its min and max. Results: one JSON per variant under --out (default bench/results/protection/;
``runs`` holds each seed's rows, quality and δ statistics, ``rows`` their mean and range), and summary.json
(``{"default", "chance", "rows": {variant: {attack: mean acc}}, "seeds": {variant: n},
"spread": {variant: {attack: [min, max]}}, "quality": ..., "delta": ...}``), rewritten after every run. Everything runs in memory
on the shard set given by --shards (default shards/glint24_32, built with
``segue shards build --src $SEGUE_FACES/glint24 --out shards/glint24_32 --test-per-identity 10 --size 32``).
Use ``OMP_NUM_THREADS=1`` per job and at most two jobs at once on a 2-core machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segue_dist.attacks import AttackerConfig  # noqa: E402
from segue_dist.attacks import transform_images as attacker_transform  # noqa: E402
from segue_dist.baselines import make_baseline_perturbations  # noqa: E402
from segue_dist.evaluate import MemoryFeed, PreparedData, TestFeed, VictimConfig, load_image_set, train_victim  # noqa: E402
from segue_dist.metrics.image_quality import psnr, ssim  # noqa: E402
from segue_dist.metrics.perturbation import delta_statistics  # noqa: E402
from segue_dist.utils.dist import best_device  # noqa: E402
from segue_dist.utils.io import atomic_write_json  # noqa: E402

ATTACKS: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "jpeg10": {"name": "jpeg10", "jpeg_quality": 10},
    "grayscale": {"name": "grayscale", "grayscale": True},
    "iss": {"name": "iss", "iss": True},
    "half_res": {"name": "half_res", "scale": 0.5},
    "cutout": {"name": "cutout", "augment": "cutout"},
    "adv2": {"name": "adv2", "adv_rho": 2 / 255},
    "op": {"name": "op", "orthogonal_projection": True},
}
# Every attack row trains the standard-stem ResNet-18 (stride-2 conv + max-pool: 2-3 CPU minutes at 32 px). On
# request (--rows), the no-attack row once more with the CIFAR-style small stem, which costs ~10x more.
SMALL_STEM_ROW = "none_small_stem"
DEFAULT_ROWS = list(ATTACKS)


def load_split(shards: Path, split: str) -> Any:
    return load_image_set(shards / split, workers=1)


# ------------------------------------------------------------------------------------------- protected sets


def protect_clean(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, args: argparse.Namespace
) -> torch.Tensor:
    return images


def protect_lsp(images: torch.Tensor, labels: torch.Tensor, num_classes: int, args: argparse.Namespace) -> torch.Tensor:
    x = images.float() / 255
    delta = make_baseline_perturbations("lsp", x, labels, num_classes, eps=args.eps, seed=args.seed)
    return quantise(images, delta, args.eps)


def protect_tap(images: torch.Tensor, labels: torch.Tensor, num_classes: int, args: argparse.Namespace) -> torch.Tensor:
    """Targeted adversarial poisoning (baselines/tap.py) with a surrogate of the victim's architecture and stem,
    from fresh weights or from ``--tap-pretrained`` (a local backbone file; its head is re-initialised), then trained
    on the clean set for ``--tap-epochs``."""
    from segue_dist.models.classifiers import build_classifier

    x = images.float() / 255
    pretrained = args.tap_pretrained or None
    delta = make_baseline_perturbations(
        "tap", x, labels, num_classes, eps=args.eps, seed=args.seed,
        model_factory=lambda: build_classifier(
            "resnet18", num_classes, images.shape[-1], pretrained=pretrained, small_stem=False
        ),
        pgd_steps=args.tap_steps, train_epochs=args.tap_epochs,
    )  # fmt: skip
    return quantise(images, delta, args.eps)


def quantise(images: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """uint8 protected images whose difference to the originals is at most round(255 eps) levels."""
    levels = round(255 * eps)
    out = (images.float() + delta * 255).round()
    out = torch.minimum(torch.maximum(out, images.float() - levels), images.float() + levels)
    return out.clamp(0, 255).to(torch.uint8)


def protect_segue(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, args: argparse.Namespace
) -> torch.Tensor:
    """Train G with the real `segue train` (one process, in this interpreter), then protect the set with it."""
    out = Path(args.work) / args.name / f"seed{args.seed}"
    gen_path = train_generator(
        args.shards / "train", out, args.seed, images.shape[-1], args.train_config, args.train_set, args.extra
    )
    protected = apply_generator(gen_path, images, labels, args.eps)
    d = protected.float() - images.float()
    args.extra["saturated_fraction"] = float((d.abs() >= round(255 * args.eps)).float().mean())
    return protected


def train_generator(
    train_split: Path, out: Path, seed: int, size: int, config: str, overrides: list[str], extra: dict[str, Any]
) -> Path:
    """Train G with `segue train` on ``train_split`` into ``out`` unless its generator exists; returns its path.

    ``extra`` receives ``train_seconds`` (when it trained) and ``train_history`` (the per-epoch losses).
    """
    from segue_dist.config import load_config
    from segue_dist.train import TrainConfig, train

    cfg = load_config(
        TrainConfig,
        config,
        [
            f"out={out}",
            f"seed={seed}",
            f"data.train={train_split}",
            f"data.image_size=[{size}]",
            "data.num_workers=0",
            "tensorboard=false",
            *overrides,
        ],
    )
    gen_path = out / "generator.safetensors"
    if not gen_path.exists():  # a rerun (--keep) reuses the trained generator and keeps the recorded train time
        t0 = time.perf_counter()
        train(cfg)
        extra["train_seconds"] = round(time.perf_counter() - t0, 1)
    extra["train_history"] = json.loads((out / "train_summary.json").read_text())["history"]
    return gen_path


def apply_generator(gen_path: Path, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """uint8 (N, 3, H, W) images protected by the generator at ``gen_path`` with side information ``labels`` (N,).

    Labels at or above G's training classes are legal (up to 2**bits - 1): an identity G never saw.
    """
    from segue_dist.weights import load_generator

    generator, _ = load_generator(gen_path)
    generator.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = images[start : start + 256].float() / 255
            chunks.append(quantise(images[start : start + 256], generator(x, labels[start : start + 256]), eps))
    return torch.cat(chunks)


def class_gratings(labels: torch.Tensor, num_classes: int, size: int) -> torch.Tensor:
    """Probe: one luminance square-wave grating per class (orientation x frequency), +-1, shape (N, 1, size, size).

    Orientations 0/30/60/90 degrees (a horizontal flip maps 30 to 150, which no other class uses), frequencies
    2..8 cycles per image side: low enough to survive JPEG-10 and half resolution, fine enough to be a texture.
    """
    freqs = [2, 3, 4, 5, 6, 8, 10, 12]
    angles = [0.0, 30.0, 60.0, 90.0]
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    pats = []
    for k in range(num_classes):
        f, a = freqs[(k // len(angles)) % len(freqs)], math.radians(angles[k % len(angles)])
        phase = 2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a)) / size
        pats.append(torch.sign(torch.cos(phase) + 1e-6))
    return torch.stack(pats)[labels].unsqueeze(1)


def class_blocks(
    labels: torch.Tensor, num_classes: int, size: int, grid: int = 4, seed: int = 0, channels: int = 1
) -> torch.Tensor:
    """Probe: one random +-1 block code per class on a grid x grid lattice (1 = luminance, 3 = colour), sharp."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2, (num_classes, channels, grid, grid), generator=g).float() * 2 - 1
    return torch.nn.functional.interpolate(codes, size=(size, size), mode="nearest")[labels]


def ar_coefficients(num_classes: int, seed: int, size: int = 36, tries: int = 2000) -> torch.Tensor:
    """Probe: one stable 3 x 3 causal AR process per class (Sandoval-Segura et al., NeurIPS 2022, section 3).

    Coefficients ~ N(0, 1) with the current pixel's weight 0, normalised to sum to 1; a set is kept when the field it
    generates from unit noise stays bounded and its matched filter (the coefficients with -1 at the current pixel)
    answers every class kept before it at least 3x more than its own. Returns (num_classes, 3, 3).
    """
    g = torch.Generator().manual_seed(seed)
    kept: list[torch.Tensor] = []
    fields: list[torch.Tensor] = []
    for _ in range(tries):
        b = torch.randn(3, 3, generator=g)
        b[2, 2] = 0
        b = b / b.sum()
        field = ar_fields(b, 2, size, g)
        if not torch.isfinite(field).all() or field.abs().max() > 1e3 or field.std() < 1e-3:
            continue
        field = field / field.std()
        own = ar_response(b, field)
        if all(
            ar_response(b, f) > 3 * own and ar_response(o, field) > 3 * ar_response(o, f)
            for o, f in zip(kept, fields, strict=True)
        ):
            kept.append(b)
            fields.append(field)
        if len(kept) == num_classes:
            return torch.stack(kept)
    raise RuntimeError(f"found only {len(kept)} of {num_classes} AR processes in {tries} tries")


def ar_response(b: torch.Tensor, fields: torch.Tensor) -> float:
    """Mean |matched-filter output| of AR process ``b`` over fields (N, H, W)."""
    f = b.clone()
    f[2, 2] = -1
    return float(torch.nn.functional.conv2d(fields.unsqueeze(1), f.view(1, 1, 3, 3)).abs().mean())


def ar_fields(b: torch.Tensor, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """n fields (n, size, size) of the AR process b, each from its own unit-normal start (first 2 rows / cols)."""
    s = torch.randn(n, size, size, generator=g)
    for i in range(size - 2):
        for j in range(size - 2):
            s[:, i + 2, j + 2] = (s[:, i : i + 3, j : j + 3] * b).flatten(1).sum(1)
    return s


def class_ar(labels: torch.Tensor, num_classes: int, size: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Probe: per-image AR noise from its class's process, L∞-normalised to 1, shape (N, channels, size, size)."""
    coeffs = ar_coefficients(num_classes * channels, seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = torch.zeros(len(labels), channels, size, size)
    for k in range(num_classes):
        idx = (labels == k).nonzero().flatten()
        for c in range(channels):
            field = ar_fields(coeffs[k * channels + c], len(idx), size + 4, g)[:, 4:, 4:]
            out[idx, c] = field / field.flatten(1).abs().amax(1).view(-1, 1, 1)
    return out


def protect_pattern(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, args: argparse.Namespace
) -> torch.Tensor:
    size = images.shape[-1]
    if args.method == "grating":
        pattern = class_gratings(labels, num_classes, size)
    elif args.method in ("ar", "colour_ar"):
        pattern = class_ar(labels, num_classes, size, seed=args.seed, channels=3 if args.method == "colour_ar" else 1)
        pattern = (pattern * args.ar_gain).clamp(-1, 1)
    else:
        channels = 3 if args.method == "colour_blocks" else 1
        pattern = class_blocks(labels, num_classes, size, grid=args.grid, seed=args.seed, channels=channels)
    return quantise(images, pattern.expand(-1, 3, -1, -1) * args.eps, args.eps)


METHODS = {
    "clean": protect_clean,
    "lsp": protect_lsp,
    "tap": protect_tap,
    "segue": protect_segue,
    "grating": protect_pattern,
    "blocks": protect_pattern,
    "colour_blocks": protect_pattern,
    "ar": protect_pattern,
    "colour_ar": protect_pattern,
}


# ---------------------------------------------------------------------------------------------------- victims


def victim_row(
    protected: torch.Tensor, labels: torch.Tensor, num_classes: int, row: str, args: argparse.Namespace
) -> dict[str, Any]:
    attack = AttackerConfig(**ATTACKS["none" if row == SMALL_STEM_ROW else row])
    small_stem = row == SMALL_STEM_ROW
    cfg = VictimConfig(epochs=args.victim_epochs, batch_size=64, seed=args.seed, small_stem=small_stem, workers=1)
    train_images = attacker_transform(protected, attack, train=True, labels=labels)
    device = best_device()  # the GPU when there is one; every row runs on CPU too
    feed = MemoryFeed(train_images, labels, cfg.batch_size, cfg.seed, device)
    test = TestFeed(str(args.shards / "test"), cfg, attack, in_memory=True)
    data = PreparedData(feed, test, num_classes, {})
    result = train_victim("resnet18", data, cfg, attack, device)
    return {
        "acc": result["final_acc"],
        "x_chance": round(result["x_chance"], 2),
        "train_acc": result["epochs"][-1]["train_acc"],
        "small_stem": small_stem,
        "seconds": result["train_seconds"],
    }


def image_quality(clean: torch.Tensor, protected: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM and L∞ of the protected set against the clean one, and the δ statistics (grey share, class cosine)."""
    x, y = clean.float() / 255, protected.float() / 255
    return {
        "psnr_db": round(float(psnr(y, x).clamp(max=100).mean()), 2),
        "ssim": round(float(ssim(y, x).mean()), 4),
        "linf_levels": int((protected.int() - clean.int()).abs().max()),
        **delta_statistics(y - x, labels),
    }


def runs_of(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A variant's runs by seed; a record written before seeds existed is its one run, seed 0."""
    if "runs" in record:
        return record["runs"]
    keys = ("rows", "quality", "train_seconds", "train_history", "saturated_fraction", "make_seconds")
    return {"0": {k: record[k] for k in keys if k in record}} if record.get("rows") else {}


def mean_rows(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each attack row over the seeds that ran it: mean accuracy ("acc"), "min", "max", "seeds" and every "accs"."""
    accs: dict[str, list[float]] = {}
    for run_ in runs.values():
        for row, result in run_.get("rows", {}).items():
            accs.setdefault(row, []).append(result["acc"])
    return {
        row: {"acc": sum(v) / len(v), "min": min(v), "max": max(v), "seeds": len(v), "accs": v}
        for row, v in accs.items()
    }


def mean_quality(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mean over seeds of every image-quality and δ statistic (L∞: the largest)."""
    merged: dict[str, list[float]] = {}
    for run_ in runs.values():
        for key, value in run_.get("quality", {}).items():
            merged.setdefault(key, []).append(value)
    return {k: (max(v) if k == "linf_levels" else round(sum(v) / len(v), 4)) for k, v in merged.items()}


def run_seed(args: argparse.Namespace, train_set: Any, record: dict[str, Any]) -> None:
    """Make the protected set for ``args.seed`` and train a victim on every row not yet in its run."""
    torch.manual_seed(args.seed)
    k = train_set.num_classes
    args.extra = {}
    t0 = time.perf_counter()
    protected = METHODS[args.method](train_set.images, train_set.labels, k, args)
    old = runs_of(record).get(str(args.seed), {}) if args.keep else {}
    run_ = {
        **old,
        "quality": image_quality(train_set.images, protected, train_set.labels),
        "make_seconds": round(time.perf_counter() - t0, 1),
        **args.extra,
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 / AVX512 kernels (ATEN_CPU_CAPABILITY)
        },
    }
    rows = dict(old.get("rows", {}))
    path = Path(args.out) / f"{args.name}.json"
    for row in args.rows.split(","):
        if row in rows and args.keep:
            continue
        t1 = time.perf_counter()
        rows[row] = victim_row(protected, train_set.labels, k, row, args)
        print(
            f"{args.name:>20} seed {args.seed} {row:>14}: {rows[row]['acc']:5.1f}%  ({time.perf_counter() - t1:.0f} s)"
        )
        run_["rows"] = rows
        save_run(path, record, str(args.seed), run_)


def save_run(path: Path, record: dict[str, Any], seed: str, run_: dict[str, Any]) -> None:
    """Write one seed's run into the variant's JSON, merged with the seeds other processes wrote meanwhile."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two seeds of one variant may run as two jobs at once
        on_disk = json.loads(path.read_text()) if path.exists() else {}
        runs = {**runs_of(on_disk), seed: run_}
        record.update(runs=runs, rows=mean_rows(runs), quality=mean_quality(runs))
        atomic_write_json(path, record)


def run(args: argparse.Namespace) -> None:
    train_set = load_split(args.shards, "train")
    path = Path(args.out) / f"{args.name}.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    record["runs"] = runs_of(record)  # a record from before seeds: its one run becomes seed 0, once
    for stale in ("train_seconds", "train_history", "saturated_fraction", "make_seconds", "env"):
        record.pop(stale, None)  # per seed now, under runs
    k = train_set.num_classes
    record.update(
        {
            "variant": args.name,
            "method": args.method,
            "hypothesis": args.hypothesis or record.get("hypothesis", ""),
            "train_set": args.train_set,
            "shards": str(args.shards),
            "image_size": int(train_set.images.shape[-1]),
            "num_classes": k,
            "chance": round(100 / k, 2),
            "victim": {
                "arch": "resnet18",
                "stem": f"standard ({SMALL_STEM_ROW}: small)",
                "epochs": args.victim_epochs,
                "optimizer": "adam 1e-3",
                "flip_crop": True,
            },
        }
    )
    for seed in (int(s) for s in args.seeds.split(",")):
        args.seed = seed
        run_seed(args, train_set, record)
    write_summary(Path(args.out), args.default)


def write_summary(out: Path, default: str) -> None:
    summary: dict[str, Any] = {"rows": {}, "seeds": {}, "spread": {}, "quality": {}}
    chance = math.nan
    for path in sorted(out.glob("*.json")):
        if path.name == "summary.json":
            continue
        record = json.loads(path.read_text())
        chance = record.get("chance", chance)
        runs = runs_of(record)
        rows = mean_rows(runs)
        name = record["variant"]
        summary["rows"][name] = {row: r["acc"] for row, r in rows.items()}
        summary["seeds"][name] = len(runs)
        summary["spread"][name] = {row: [r["min"], r["max"]] for row, r in rows.items()}
        summary["quality"][name] = mean_quality(runs)
    summary_path = out / "summary.json"
    old = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    atomic_write_json(summary_path, {"default": default or old.get("default", ""), "chance": chance, **summary})


def cell(mean: float | None, spread: list[float] | None) -> str:
    """'12.3 (10.0–15.4)' for a row run on several seeds, '12.3' for one, '–' when not run."""
    if mean is None:
        return "–"
    if spread and spread[1] > spread[0]:
        return f"{mean:.1f} ({spread[0]:.1f}–{spread[1]:.1f})"
    return f"{mean:.1f}"


def markdown_table(out: Path) -> str:
    """summary.json as the README's Markdown table: one line per variant, one column per attack row."""
    summary = json.loads((out / "summary.json").read_text())
    columns = [*ATTACKS, SMALL_STEM_ROW]
    header = [*columns, "PSNR dB", "grey share", "class cos", "seeds"]
    lines = [
        "| variant | " + " | ".join(header) + " |",
        "|---" * (len(header) + 1) + "|",
    ]
    order = [n for n in ("clean", "lsp", summary["default"]) if n in summary["rows"]]
    names = order + sorted(n for n in summary["rows"] if n not in order)
    for name in names:
        row = summary["rows"].get(name, {})
        label = f"**{name}** (default)" if name == summary["default"] else name
        spread = summary.get("spread", {}).get(name, {})
        cells = [cell(row.get(c), spread.get(c)) for c in columns]
        quality = summary.get("quality", {}).get(name, {})
        psnr_db = quality.get("psnr_db")
        extra = [
            "–" if psnr_db is None else f"{psnr_db:.1f}" + (" (< 30 dB)" if psnr_db < 30 else ""),
            *(f"{quality[k]:.2f}" if k in quality else "–" for k in ("grey_energy_share", "class_mean_cosine")),
            str(summary.get("seeds", {}).get(name, 1)),
        ]
        lines.append(f"| {label} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="make one variant's protected set and attack it with every row")
    r.add_argument("--name", required=True)
    r.add_argument("--method", choices=sorted(METHODS), required=True)
    r.add_argument("--hypothesis", default="")
    r.add_argument("--shards", type=Path, default=REPO / "shards/glint24_32")
    r.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    r.add_argument("--victim-epochs", type=int, default=8)
    r.add_argument("--eps", type=float, default=8 / 255)
    r.add_argument("--seeds", default="0", help="comma-separated seeds (G's training seed and the victim's)")
    r.add_argument("--tap-steps", type=int, default=30, help="tap: targeted PGD steps")
    r.add_argument("--tap-epochs", type=int, default=10, help="tap: the surrogate's epochs on the clean set")
    r.add_argument("--tap-pretrained", default="", help="tap: local backbone weights the surrogate starts from")
    r.add_argument("--grid", type=int, default=4, help="blocks probe: cells per side")
    r.add_argument("--ar-gain", type=float, default=1.0, help="AR probe: gain on the L∞-normalised field, then clip")
    r.add_argument("--train-config", default=str(REPO / "configs/train/default.yaml"))
    r.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--work", default=str(REPO / "runs/protection"))
    r.add_argument("--out", default=str(REPO / "bench/results/protection"))
    r.add_argument("--keep", action="store_true", help="keep rows already in the variant's JSON")
    r.add_argument("--default", default="")
    s = sub.add_parser("summary", help="rewrite summary.json from the variant JSONs")
    s.add_argument("--out", default=str(REPO / "bench/results/protection"))
    s.add_argument("--default", default="")
    t = sub.add_parser("table", help="print summary.json as a Markdown table")
    t.add_argument("--out", default=str(REPO / "bench/results/protection"))
    args = p.parse_args()
    os.makedirs(getattr(args, "out", "."), exist_ok=True)
    if args.cmd == "summary":
        write_summary(Path(args.out), args.default)
    elif args.cmd == "table":
        print(markdown_table(Path(args.out)))
    else:
        run(args)


if __name__ == "__main__":
    main()
