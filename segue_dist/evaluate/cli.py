"""`segue evaluate victim|baseline|quality|sweep` / `python -m segue_dist.evaluate`: arguments and actions."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from segue_dist.attacks import AttackerConfig
from segue_dist.config import ConfigError, load_config, save_resolved
from segue_dist.evaluate.baseline import write_baseline
from segue_dist.evaluate.config import BASELINE_METHODS, BaselineConfig, SweepConfig, VictimRunConfig
from segue_dist.evaluate.quality import run_quality
from segue_dist.evaluate.sweep import print_results_table, run_sweep
from segue_dist.evaluate.victim import run_victim
from segue_dist.utils.device import resolve_device
from segue_dist.utils.io import atomic_write_json
from segue_dist.utils.progress import console, print_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    victim = sub.add_parser("victim", help="train a victim on a (protected) split, test on clean")
    victim.add_argument("--config", help="YAML with VictimRunConfig fields")
    victim.add_argument("--train", dest="train_dir", help="training split (protected)")
    victim.add_argument("--test", dest="test_dir", help="clean test split")
    victim.add_argument("--clean-train", help="clean training split (partial protection; the control)")
    victim.add_argument("--control", action="store_true", default=None, help="also train on --clean-train")
    victim.add_argument("--arch", help="resnet18 | resnet50 | mobilenet_v2 | inception_v3 | efficientnet_b1 | swin_t")
    victim.add_argument("--out", help="folder for the result JSON(s)")
    victim.add_argument("--device", help="cpu | cuda | cuda:1 (default: CUDA when present)")
    victim.add_argument(
        "overrides", nargs="*", default=[], help="key=value, e.g. train.epochs=8 attack.jpeg_quality=10"
    )

    base = sub.add_parser("baseline", help="write a baseline-protected copy of a training split")
    base.add_argument("--config", help="YAML with BaselineConfig fields")
    base.add_argument("--method", choices=list(BASELINE_METHODS))
    base.add_argument("--in", dest="in_dir", help="clean training split")
    base.add_argument("--out", dest="out_dir", help="output split folder")
    base.add_argument("--eps", help="L∞ budget in [0, 1] units, e.g. 8/255")
    base.add_argument("--seed", type=int)
    base.add_argument("--size", type=int, help="resize to this side first (default: as stored)")
    base.add_argument("--device")
    base.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. options.max_rounds=10")

    quality = sub.add_parser("quality", help="image quality of a protected split against its clean split (by key)")
    quality.add_argument("--clean", required=True)
    quality.add_argument("--protected", required=True)
    quality.add_argument("--lpips-weights", default="", help="local AlexNet ImageNet state dict (enables LPIPS)")
    quality.add_argument("--lpips-lin", default="", help="local LPIPS v0.1 lin weights (calibrated LPIPS)")
    quality.add_argument("--out", help="result JSON (default: <protected>/quality.json)")
    quality.add_argument("--device")

    sweep = sub.add_parser("sweep", help="every row of an experiment config, resumable")
    sweep.add_argument("--config", required=True, help="configs/experiments/<name>.yaml")
    sweep.add_argument("--only", default="", help="run the rows whose name matches this glob (method__victim__attack)")
    sweep.add_argument("--dry-run", action="store_true", help="print the rows and exit")
    sweep.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. train.size=224 train.epochs=60")


def _flag_overrides(args: argparse.Namespace, names: list[str]) -> list[str]:
    out = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out.append(f"{name}={value}")
    return out


def run(args: argparse.Namespace) -> int:
    return {"victim": _cli_victim, "baseline": _cli_baseline, "quality": _cli_quality, "sweep": _cli_sweep}[
        args.action
    ](args)


def _cli_victim(args: argparse.Namespace) -> int:
    flags = _flag_overrides(args, ["train_dir", "test_dir", "clean_train", "control", "arch", "out", "device"])
    cfg = load_config(VictimRunConfig, args.config, [*flags, *args.overrides])
    if not cfg.train_dir or not cfg.test_dir:
        raise ConfigError("evaluate victim needs --train and --test")
    if cfg.control and not cfg.clean_train:
        raise ConfigError("--control needs --clean-train")
    out = Path(cfg.out)
    save_resolved(cfg, out, "victim_config.yaml")
    device = resolve_device(cfg.device)
    runs = [(cfg.method, cfg.train_dir)] + ([("clean", cfg.clean_train)] if cfg.control else [])
    results = []
    for method, train_dir in runs:
        attack = cfg.attack
        if method == "clean" and attack.protected_fraction < 1.0:
            attack = AttackerConfig(**{**asdict(attack), "protected_fraction": 1.0})
        tags = {"dataset": cfg.dataset, "method": method}
        result = run_victim(
            arch=cfg.arch,
            train_dir=train_dir,
            test_dir=cfg.test_dir,
            cfg=cfg.train,
            attack=attack,
            tags=tags,
            device=device,
            clean_train=cfg.clean_train,
        )
        atomic_write_json(out / f"{result['name']}.json", result)
        results.append(result)
    print_results_table(results, f"clean-test accuracy (chance {results[0]['chance']:.1f}%) -> {out}")
    return 0


def _cli_baseline(args: argparse.Namespace) -> int:
    cfg = load_config(
        BaselineConfig,
        args.config,
        [*_flag_overrides(args, ["method", "in_dir", "out_dir", "eps", "seed", "size", "device"]), *args.overrides],
    )
    if not cfg.in_dir or not cfg.out_dir:
        raise ConfigError("evaluate baseline needs --in and --out")
    stats = write_baseline(cfg)
    print_table(
        f"baseline {cfg.method} -> {cfg.out_dir}",
        ["samples", "eps /255", "max |δ| /255", "generation s", "total s"],
        [
            [
                str(stats["samples"]),
                f"{cfg.eps * 255:.2f}",
                str(stats["check"]["linf_255"]),
                f"{stats['generation_s']:.2f}",
                f"{stats['total_s']:.2f}",
            ]
        ],
    )
    return 0


def _cli_quality(args: argparse.Namespace) -> int:
    device = resolve_device(args.device or "")
    result = run_quality(
        args.clean, args.protected, lpips_weights=args.lpips_weights, lpips_lin=args.lpips_lin, device=device
    )
    out = Path(args.out) if args.out else Path(args.protected) / "quality.json"
    atomic_write_json(out, result)
    m = result["metrics"]
    names = [n for n in ("psnr", "ssim", "ms_ssim", "lpips", "mae", "rmse", "linf_255") if n in m]
    print_table(f"image quality: {result['counts']['pairs']} pairs -> {out}", names, [[f"{m[n]:.4g}" for n in names]])
    for name, note in result["notes"].items():
        console.print(f"{name}: {note}")
    if result["counts"]["unpaired"]:
        console.print(f"[yellow]{result['counts']['unpaired']} protected samples without a clean counterpart[/]")
    return 0


def _cli_sweep(args: argparse.Namespace) -> int:
    cfg = load_config(SweepConfig, args.config, args.overrides)
    run_sweep(cfg, only=args.only, dry_run=args.dry_run)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from segue_dist.cli import stage_main

    return stage_main("evaluate", argv)
