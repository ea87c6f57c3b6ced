"""`segue evaluate sweep`: every (method x victim x attack) row of an experiment, one JSON per row, resumable (a
row whose JSON exists with the same settings is skipped); baselines and image quality made on demand."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from segue_dist.attacks import AttackerConfig
from segue_dist.config import ConfigError, config_hash, save_resolved, to_dict
from segue_dist.evaluate.baseline import BASELINE_STATS, baseline_is_complete, write_baseline
from segue_dist.evaluate.config import ENROLMENT_VICTIMS, BaselineConfig, MethodSpec, SweepConfig
from segue_dist.evaluate.enrolment import EmbeddingCache, require_face_model, run_enrolment
from segue_dist.evaluate.quality import run_quality
from segue_dist.evaluate.victim import row_name, run_victim
from segue_dist.utils.device import resolve_device
from segue_dist.utils.io import atomic_write_json, read_json
from segue_dist.utils.progress import console, print_table


@dataclass
class Row:
    method: MethodSpec
    victim: str
    attack: AttackerConfig
    train_dir: str

    @property
    def name(self) -> str:
        return row_name(self.method.name, self.victim, self.attack.name)


def method_train_dir(cfg: SweepConfig, method: MethodSpec) -> str:
    """The method's training split; ``{size}`` in a path becomes the victims' image size (baselines differ by size)."""
    if method.train:
        path = method.train
    elif method.name == "clean":
        path = cfg.data.clean_train
    else:
        path = str(Path(cfg.out) / "baselines" / f"{method.name}-{{size}}" / "train")
    return path.replace("{size}", str(cfg.train.size or "native"))


def _victim_attacks(cfg: SweepConfig, victim: str) -> list[AttackerConfig]:
    # An enrolment victim trains nothing, so the attacker's transforms do not apply: one plain row per method.
    if victim in ENROLMENT_VICTIMS:
        return [next((a for a in cfg.attacks if a.group == "none"), AttackerConfig())]
    return cfg.attacks


def plan_rows(cfg: SweepConfig, only: str = "") -> list[Row]:
    rows = [
        Row(method, victim, attack, method_train_dir(cfg, method))
        for method in cfg.methods
        for victim in cfg.victims
        for attack in _victim_attacks(cfg, victim)
    ]
    return [r for r in rows if not only or fnmatch.fnmatch(r.name, only)]


def _row_hash(cfg: SweepConfig, row: Row) -> str:
    # What decides a row's number: a saved row with the same hash is reused on resume, any change reruns it.
    blob = {
        "data": asdict(cfg.data),
        "train_dir": row.train_dir,
        "victim": row.victim,
        "attack": asdict(row.attack),
        "train": asdict(cfg.train),
        "seed": cfg.seed,
    }
    if row.victim in ENROLMENT_VICTIMS:  # nothing is trained: only the image size of the train recipe matters
        blob["train"] = {"size": cfg.train.size}
    return config_hash(blob)


def _check_inputs(cfg: SweepConfig, rows: list[Row]) -> None:
    """Fail before any training when an input that cannot be generated here (or the face model) is missing."""
    if any(row.victim in ENROLMENT_VICTIMS for row in rows):
        require_face_model()
    needed = {cfg.data.test: "data.test", cfg.data.clean_train: "data.clean_train"}
    for row in rows:
        if not row.method.baseline:
            needed.setdefault(row.train_dir, f"methods.{row.method.name}.train")
    for path, what in needed.items():
        if not path:
            raise ConfigError(f"{what} is empty")
        if not (Path(path) / "sizes.json").is_file():
            hint = (
                " (make it with `segue protect --generator G --in <clean train> --out <this>`)"
                if what.startswith("methods")
                else ""
            )
            raise FileNotFoundError(f"{what}: no finished shard set at {path}{hint}")


def ensure_baselines(cfg: SweepConfig, rows: list[Row], device: torch.device, show_progress: bool) -> dict[str, Any]:
    """Generate every baseline training set a row needs and is missing; reuse one made with the same settings."""
    out: dict[str, Any] = {}
    for method in {r.method.name: r.method for r in rows}.values():
        if not method.baseline:
            continue
        train_dir = method_train_dir(cfg, method)
        bcfg = BaselineConfig(
            method=method.baseline, in_dir=cfg.data.clean_train, out_dir=train_dir, eps=method.eps, seed=cfg.seed,
            size=cfg.train.size, surrogate=cfg.surrogate, surrogate_small_stem=cfg.train.small_stem, device=str(device),
            options=dict(method.options),
        )  # fmt: skip
        if baseline_is_complete(train_dir):
            _check_same_baseline(read_json(Path(train_dir) / BASELINE_STATS), bcfg)
        else:
            write_baseline(bcfg, show_progress)
        out[method.name] = read_json(Path(train_dir) / BASELINE_STATS)
    return out


def _check_same_baseline(stats: dict[str, Any], wanted: BaselineConfig) -> None:
    # A baseline set made with other settings must not be reused silently (e.g. 32 px noise for a 224 px sweep).
    have = stats.get("config", {})
    for name in ("method", "in_dir", "eps", "seed", "size", "options"):
        if have.get(name) != getattr(wanted, name):
            raise ValueError(
                f"{wanted.out_dir} was made with {name}={have.get(name)!r}, this sweep needs {getattr(wanted, name)!r}; "
                "delete it or point the method's `train` elsewhere (paths may contain {size})"
            )


def run_sweep(cfg: SweepConfig, *, only: str = "", dry_run: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every row; returns the combined results (also written to <out>/results.json)."""
    rows = plan_rows(cfg, only)
    if not rows:
        raise ValueError(f"no row matches --only {only!r}")
    out = Path(cfg.out)
    _print_plan(cfg, rows, out)
    if dry_run:
        return {}
    _check_inputs(cfg, rows)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out, "sweep_config.yaml")
    device = resolve_device(cfg.device)
    baselines = ensure_baselines(cfg, rows, device, show_progress)
    quality = _sweep_quality(cfg, rows, device) if cfg.quality else {}
    cache = EmbeddingCache()  # the clean test set is embedded once for every enrolment row
    results = [_run_row(cfg, row, device, out, show_progress, cache) for row in rows]
    combined = {
        "kind": "sweep",
        "name": cfg.name,
        "config": to_dict(cfg),
        "data": {"dataset": cfg.data.dataset, "clean_train": cfg.data.clean_train, "test": cfg.data.test},
        "methods": {
            m.name: {"train": method_train_dir(cfg, m), "baseline": m.baseline, "source": m.source, "time_s": m.time_s}
            for m in cfg.methods
        },
        "rows": results,
        "quality": quality,
        "baselines": baselines,
    }
    atomic_write_json(out / "results.json", combined)
    print_results_table(results, f"{cfg.name}: clean-test accuracy (chance {results[0]['chance']:.1f}%)")
    return combined


def _run_row(
    cfg: SweepConfig, row: Row, device: torch.device, out: Path, show_progress: bool, cache: EmbeddingCache
) -> dict[str, Any]:
    path = out / "rows" / f"{row.name}.json"
    digest = _row_hash(cfg, row)
    if path.is_file():
        saved = read_json(path)
        if saved.get("row_hash") == digest:
            console.print(f"[dim]skip {row.name}: done ({saved['final_acc']:.1f}%)[/]")
            return saved
        console.print(f"[yellow]rerun {row.name}: its settings changed since {path} was written[/]")
    tags = {"dataset": cfg.data.dataset, "method": row.method.name, "sweep": cfg.name, "source": row.method.source}
    if row.victim in ENROLMENT_VICTIMS:
        console.print(f"enrolment {row.name}: embedding {row.train_dir} and {cfg.data.test} with dlib")
        result = run_enrolment(
            victim=row.victim, train_dir=row.train_dir, test_dir=cfg.data.test, size=cfg.train.size,
            attack=row.attack, tags=tags, cache=cache,
        )  # fmt: skip
    else:
        result = run_victim(
            arch=row.victim, train_dir=row.train_dir, test_dir=cfg.data.test, cfg=cfg.train, attack=row.attack,
            tags=tags, device=device, clean_train=cfg.data.clean_train, show_progress=show_progress,
        )  # fmt: skip
    result["row_hash"] = digest
    atomic_write_json(path, result)
    return result


def _sweep_quality(cfg: SweepConfig, rows: list[Row], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in {r.method.name: r.method for r in rows}.values():
        train_dir = method_train_dir(cfg, method)
        if method.name == "clean" or train_dir == cfg.data.clean_train:
            continue
        path = Path(cfg.out) / "quality" / f"{method.name}.json"
        if path.is_file() and read_json(path).get("protected") == train_dir:
            out[method.name] = read_json(path)
            continue
        result = run_quality(
            cfg.data.clean_train, train_dir, lpips_weights=cfg.lpips_weights, lpips_lin=cfg.lpips_lin, device=device
        )
        result.update(method=method.name, dataset=cfg.data.dataset)
        atomic_write_json(path, result)
        out[method.name] = result
    return out


def _print_plan(cfg: SweepConfig, rows: list[Row], out: Path) -> None:
    table = [[r.name, r.train_dir, "done" if (out / "rows" / f"{r.name}.json").is_file() else ""] for r in rows]
    print_table(f"sweep {cfg.name}: {len(rows)} rows -> {out}", ["row", "training set", "status"], table)


def print_results_table(results: list[dict[str, Any]], title: str) -> None:
    rows = [
        [r["name"], f"{r['final_acc']:.2f}", f"{r['chance']:.2f}", f"{r['x_chance']:.2f}", f"{r['wall_s']:.0f}"]
        for r in results
    ]
    print_table(title, ["row", "clean-test acc %", "chance %", "x chance", "wall s"], rows)
