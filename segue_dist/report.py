"""`segue report`: the paper's tables and figures from `segue evaluate` results, as Markdown and self-contained HTML.

    segue report --results runs/eval --out reports/eval [--samples 4]

Reads every result JSON under ``--results`` (sweep rows, `evaluate victim` outputs, quality and baseline stats, sweep
``results.json`` files) and writes ``report.md`` (figures beside it under ``figures/``) and ``report.html`` (figures
embedded as base64 PNG, so the one file can be mailed around). Sections follow the paper: effectiveness (Table I),
transfer across victims (Table IV) and datasets (Table V), robustness (Table VI, Fig. 3: JPEG, adversarial training,
augmentations, grayscale / ISS, lower resolution, partial protection), image quality (Table III), time (Table VII), a
picture grid (Fig. 2: clean, protected, residual x30) and the JPEG-quality curve (Fig. 3 (1)).

Every accuracy is the clean-test accuracy of a victim trained on the protected set (lower = better protection), shown
with its ratio to chance (100/K).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from segue_dist.data.loader import OnePassStream, Record, image_from_bytes, open_shard_set, read_sample_bytes
from segue_dist.protect import MANIFEST_NAME, SETTINGS_NAME
from segue_dist.utils.io import atomic_write_bytes, atomic_write_text, read_json
from segue_dist.utils.progress import console

RESIDUAL_GAIN = 30  # the paper's Fig. 2 magnification
DEFAULT_VICTIM = "resnet18"  # the defender's surrogate and the paper's default attacker
GROUP_TITLES = {
    "jpeg": "JPEG compression of the training set (quality q)",
    "adversarial": "Adversarial training (attacker radius ρ_a)",
    "augment": "Data augmentation",
    "grayscale": "Grayscale",
    "iss": "ISS (grayscale + JPEG-10)",
    "resolution": "Training at a lower resolution",
    "partial": "Partial protection (share of protected training images)",
    "combined": "Combined attacks",
}
METHOD_ORDER = ("clean", "segue", "ue", "lsp", "random")
# The evaluation goals for Segue, as a ratio to chance: no attack on any victim, and the attacks that undo weaker
# protections (JPEG-10, grayscale, ISS, adversarial training at 4/255, training at 1/2 and 1/4 resolution).
GOAL_PLAIN = 1.2
GOAL_ROBUST = 1.5


# -------------------------------------------------------------------------------------------------------- collecting


@dataclass
class Results:
    victims: list[dict[str, Any]] = field(default_factory=list)
    quality: list[dict[str, Any]] = field(default_factory=list)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    sweeps: list[dict[str, Any]] = field(default_factory=list)


def collect(results_dir: str | Path) -> Results:
    """Every result JSON below ``results_dir``, by kind; a victim seen twice (row file and results.json) counts once."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder not found: {root}")
    out = Results()
    victims: dict[tuple[str, str], dict[str, Any]] = {}
    quality: dict[tuple[str, str], dict[str, Any]] = {}  # `evaluate quality` and a sweep may both have measured a pair
    for path in sorted(root.rglob("*.json")):
        if path.name.endswith("._stats.json") or path.name in ("sizes.json", "labels.json"):
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError):
            console.print(f"[yellow]skipping unreadable {path}[/]")
            continue
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind == "victim":
            victims[(str(data["tags"].get("dataset", "")), data["name"])] = data
        elif kind == "sweep":
            out.sweeps.append(data)
            for row in data.get("rows", []):
                victims.setdefault((str(row["tags"].get("dataset", "")), row["name"]), row)
            # A sweep's results.json carries its quality records too: a report from that one file keeps Table III.
            for record in (data.get("quality") or {}).values():
                if isinstance(record, dict) and record.get("kind") == "quality":
                    quality.setdefault(_quality_pair(record), record)
        elif kind == "quality":
            quality[_quality_pair(data)] = data
        elif kind == "baseline":
            out.baselines.append(data)
    out.victims = list(victims.values())
    out.quality = list(quality.values())
    return out


def _quality_pair(record: dict[str, Any]) -> tuple[str, str]:
    return str(record.get("clean")), str(record.get("protected"))


def method_key(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(METHOD_ORDER):
        if name == prefix or name.startswith(prefix + "-") or name.startswith(prefix + "_"):
            return i, name
    return len(METHOD_ORDER), name


def _attack_sort_key(attack: dict[str, Any]) -> tuple:
    # Order columns by strength: higher JPEG quality / lower radius / higher resolution first.
    return (
        -attack.get("jpeg_quality", 0),
        attack.get("adv_rho", 0.0),
        -attack.get("resolution", 0),
        -attack.get("scale", 1.0),
        -attack.get("protected_fraction", 1.0),
        attack.get("augment", "none"),
        attack.get("name", ""),
    )


# ------------------------------------------------------------------------------------------------------------ tables


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


def fmt_acc(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    return f"{row['final_acc']:.2f} ({row['x_chance']:.1f}×)"


def _pick(victims: list[dict[str, Any]], **tags: Any) -> list[dict[str, Any]]:
    out = []
    for v in victims:
        t = v["tags"]
        if all((t.get(k) == val) for k, val in tags.items()):
            out.append(v)
    return out


def _default_victim(victims: list[dict[str, Any]]) -> str:
    names = {v["tags"]["victim"] for v in victims}
    return DEFAULT_VICTIM if DEFAULT_VICTIM in names or not names else sorted(names)[0]


def _methods(victims: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({v["tags"]["method"] for v in victims}, key=method_key)


def _chance(victims: list[dict[str, Any]]) -> str:
    values = sorted({round(v["chance"], 2) for v in victims})
    return ", ".join(f"{c:.2f}" for c in values)


def effectiveness_table(victims: list[dict[str, Any]]) -> Table | None:
    """Table I: methods x datasets, default victim, no attack."""
    victim = _default_victim(victims)
    plain = _pick(victims, victim=victim, group="none")
    if not plain:
        return None
    datasets = sorted({v["tags"]["dataset"] for v in plain})
    cell = {(v["tags"]["method"], v["tags"]["dataset"]): v for v in plain}
    rows = [[m, *[fmt_acc(cell.get((m, d))) for d in datasets]] for m in _methods(plain)]
    rows.append(["chance", *[_chance(_pick(plain, dataset=d)) for d in datasets]])
    return Table(f"Effectiveness: clean-test accuracy % ↓ ({victim} victim)", ["method", *datasets], rows)


def victims_table(victims: list[dict[str, Any]], dataset: str) -> Table | None:
    """Table IV: methods x victim architectures on one dataset, no attack."""
    plain = _pick(victims, dataset=dataset, group="none")
    archs = sorted({v["tags"]["victim"] for v in plain})
    if len(archs) < 2:
        return None
    cell = {(v["tags"]["method"], v["tags"]["victim"]): v for v in plain}
    rows = [[m, *[fmt_acc(cell.get((m, a))) for a in archs]] for m in _methods(plain)]
    return Table(f"Transfer across victims ({dataset}): clean-test accuracy % ↓", ["method", *archs], rows)


def datasets_table(victims: list[dict[str, Any]]) -> Table | None:
    """Table V: protection made elsewhere (``source`` tag) applied to each dataset."""
    victim = _default_victim(victims)
    plain = _pick(victims, victim=victim, group="none")
    if not any(v["tags"].get("source") for v in plain):
        return None
    datasets = sorted({v["tags"]["dataset"] for v in plain})
    cell = {(v["tags"]["method"], v["tags"]["dataset"]): v for v in plain}
    sources = {(v["tags"]["method"], v["tags"]["dataset"]): v["tags"].get("source", "") for v in plain}
    rows = []
    for m in _methods(plain):
        rows.append([m, *[_with_source(fmt_acc(cell.get((m, d))), sources.get((m, d), "")) for d in datasets]])
    note = "In brackets: where the protection came from (e.g. a generator trained on another dataset)."
    return Table(
        f"Transfer across datasets: clean-test accuracy % ↓ ({victim} victim)", ["method", *datasets], rows, note
    )


def _with_source(text: str, source: str) -> str:
    return f"{text} [{source}]" if source and text != "–" else text


def attack_label(name: str, attack: dict[str, Any]) -> str:
    """A column heading in the paper's terms (q=10, ρ_a=2/255, 16 px, p=0.5); the attack's name otherwise."""
    group = attack.get("group") or ""
    if group == "jpeg":
        return f"q={attack['jpeg_quality']}"
    if group == "adversarial":
        return f"ρ_a={attack['adv_rho'] * 255:g}/255"
    if group == "resolution":
        return f"{attack['resolution']} px" if attack.get("resolution") else f"×{attack['scale']:g} res."
    if group == "partial":
        return f"p={attack['protected_fraction']:g}"
    return name


def robustness_tables(victims: list[dict[str, Any]], dataset: str) -> list[Table]:
    """One table per attack family: methods x settings, with the no-attack column as the reference."""
    victim = _default_victim(victims)
    rows_all = _pick(victims, dataset=dataset, victim=victim)
    groups = sorted(
        {v["tags"]["group"] for v in rows_all} - {"none"},
        key=lambda g: list(GROUP_TITLES).index(g) if g in GROUP_TITLES else 99,
    )
    baseline = {v["tags"]["method"]: v for v in rows_all if v["tags"]["group"] == "none"}
    tables = []
    for group in groups:
        members = [v for v in rows_all if v["tags"]["group"] == group]
        attacks = {v["tags"]["attack"]: v["tags"].get("attack_config", {}) for v in members}
        names = sorted(attacks, key=lambda a: _attack_sort_key(attacks[a]))
        cell = {(v["tags"]["method"], v["tags"]["attack"]): v for v in members}
        labels = [attack_label(a, {**attacks[a], "group": group}) for a in names]
        columns = ["method", *(["no attack"] if baseline else []), *labels]
        rows = [
            [m, *([fmt_acc(baseline.get(m))] if baseline else []), *[fmt_acc(cell.get((m, a))) for a in names]]
            for m in _methods(members)
        ]
        title = f"Robustness — {GROUP_TITLES.get(group, group)} — {dataset}, {victim}: clean-test accuracy % ↓"
        tables.append(Table(title, columns, rows))
    return tables


def goal_for(attack: dict[str, Any]) -> float | None:
    """The ratio-to-chance goal a Segue row is held to, or None where the goals say nothing.

    An attack no stronger than one the goals name (JPEG above quality 10, ρ_a below 4/255, a scale above 1/4) is held
    to the same bound: protection that holds against the stronger attack must hold against the milder one.
    """
    group = attack.get("group") or "none"
    if group == "none":
        return GOAL_PLAIN
    if group in ("grayscale", "iss"):
        return GOAL_ROBUST
    if group == "jpeg":
        return GOAL_ROBUST if attack.get("jpeg_quality", 100) >= 10 else None
    if group == "adversarial":
        return GOAL_ROBUST if attack.get("adv_rho", 0.0) <= 4 / 255 + 1e-9 else None
    if group == "resolution":
        return GOAL_ROBUST if attack.get("scale", 1.0) >= 0.25 else None
    return None


def goals_table(victims: list[dict[str, Any]]) -> Table | None:
    """Every Segue row the goals name: its ratio to chance against the goal, met or not."""
    rows = []
    for v in sorted(
        victims,
        key=lambda v: (
            v["tags"].get("dataset", ""),
            v["tags"]["victim"],
            v["tags"]["group"] != "none",
            v["tags"]["attack"],
        ),
    ):
        tags = v["tags"]
        if method_key(tags["method"])[0] != METHOD_ORDER.index("segue"):
            continue
        goal = goal_for({**tags.get("attack_config", {}), "group": tags.get("group")})
        if goal is None:
            continue
        met = "yes" if v["x_chance"] <= goal else "**no**"
        rows.append([tags.get("dataset", ""), tags["victim"], tags["attack"], fmt_acc(v), f"≤ {goal:g}×", met])
    if not rows:
        return None
    note = (
        f"Goals: ≤ {GOAL_PLAIN:g}× chance with no attack on every victim; ≤ {GOAL_ROBUST:g}× under JPEG-10, grayscale, "
        "ISS, adversarial training at ρ_a = 4/255 and training at 1/2 and 1/4 resolution."
    )
    return Table(
        "Goals: Segue against the targets", ["dataset", "victim", "attack", "accuracy", "goal", "met"], rows, note
    )


def quality_table(quality: list[dict[str, Any]]) -> Table | None:
    """Table III: image quality of each protected set against its clean set."""
    if not quality:
        return None
    names = ["psnr", "ssim", "ms_ssim", "lpips", "mae", "rmse", "linf_255"]
    heads = ["PSNR ↑", "SSIM ↑", "MS-SSIM ↑", "LPIPS ↓", "MAE ↓", "RMSE ↓", "L∞ (/255)"]
    rows, notes = [], set()
    for q in sorted(quality, key=lambda q: (q.get("dataset", ""), method_key(q.get("method", q["protected"])))):
        m = q["metrics"]
        label = f"{q.get('method', Path(q['protected']).parent.name)}" + (
            f" ({q['dataset']})" if q.get("dataset") else ""
        )
        rows.append([label, *[(f"{m[n]:.4g}" if n in m else "–") for n in names]])
        notes.update(f"{k}: {v}" for k, v in q.get("notes", {}).items())
    return Table(
        "Image quality (protected vs clean, paired by key)", ["method", *heads], rows, "; ".join(sorted(notes))
    )


def time_table(results: Results) -> Table | None:
    """Table VII: wall time to protect a training set (baselines: generation only; Segue: protect shard seconds)."""
    rows = []
    for b in sorted(results.baselines, key=lambda b: method_key(b["method"])):
        n = max(1, b["samples"])
        rows.append(
            [
                b["method"],
                str(b["samples"]),
                f"{b['generation_s']:.2f}",
                f"{1000 * b['generation_s'] / n:.2f}",
                b.get("device", ""),
            ]
        )
    for sweep in results.sweeps:
        for name, method in sweep.get("methods", {}).items():
            seconds, count, compute = _protect_time(method)
            if seconds is not None and not method.get("baseline"):
                rows.append([name, str(count), f"{seconds:.2f}", f"{1000 * seconds / max(1, count):.2f}", compute])
    if not rows:
        return None
    note = "Baselines: perturbation generation only (reading and writing excluded). Segue: `segue protect` shard seconds (generator inference + encode, one-off generator training excluded), or `time_s` from the config."
    return Table(
        "Time to protect the training set", ["method", "images", "seconds", "ms / image", "device"], _dedupe(rows), note
    )


def _protect_time(method: dict[str, Any]) -> tuple[float | None, int, str]:
    """(protect seconds, images, where G ran) from a `segue protect` output folder, or the config's `time_s`."""
    if method.get("time_s"):
        return float(method["time_s"]), 0, str(method.get("device", ""))
    folder = Path(method.get("train", ""))
    if not (folder / MANIFEST_NAME).is_file():
        return None, 0, ""
    stats = [read_json(p) for p in sorted(folder.glob("*._stats.json"))]
    settings = folder / SETTINGS_NAME
    compute = str(read_json(settings).get("compute", "")) if settings.is_file() else ""
    seconds = sum(float(s.get("seconds", 0.0)) for s in stats)
    return seconds, sum(int(s.get("written", 0)) for s in stats), compute


def _dedupe(rows: list[list[str]]) -> list[list[str]]:
    seen, out = set(), []
    for row in rows:
        if tuple(row) not in seen:
            seen.add(tuple(row))
            out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------------ figures


@dataclass
class Figure:
    title: str
    name: str  # file name under figures/
    data: bytes
    mime: str  # image/png or image/svg+xml
    caption: str = ""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def load_keys(split_dir: str | Path, keys: set[str]) -> dict[str, Tensor]:
    """Decode only the wanted samples of a split, stopping once all are found."""
    found: dict[str, Tensor] = {}
    for shard in open_shard_set(split_dir).shards:
        for record in OnePassStream([shard], decode=False, keep_raw=True):
            if isinstance(record, Record) and record.key in keys and record.raw is not None:
                data = read_sample_bytes(record.raw)
                if data:
                    found[record.key] = image_from_bytes(data)
        if len(found) == len(keys):
            break
    return found


def pick_keys(split_dir: str | Path, count: int) -> list[str]:
    """``count`` keys spread evenly over the first shard's sorted keys (keys start with the label: varied identities)."""
    shard = open_shard_set(split_dir).shards[0]
    keys = sorted(r.key for r in OnePassStream([shard], decode=False) if isinstance(r, Record) and r.error is None)
    if not keys:
        return []
    idx = np.linspace(0, len(keys) - 1, num=min(count, len(keys))).round().astype(int)
    return [keys[i] for i in sorted(set(idx.tolist()))]


def picture_grid(clean_dir: str, protected: dict[str, str], count: int = 4, cell: int = 112) -> Image.Image | None:
    """Fig. 2: per sample, the clean image, then each method's protected image and its residual |x' - x| x 30."""
    if not protected:
        return None
    keys = pick_keys(next(iter(protected.values())), count)
    clean = load_keys(clean_dir, set(keys))
    sets = {name: load_keys(path, set(keys)) for name, path in protected.items()}
    keys = [k for k in keys if k in clean and all(k in s and s[k].shape == clean[k].shape for s in sets.values())]
    if not keys:
        return None
    headers = ["clean"] + [h for name in protected for h in (name, f"residual x{RESIDUAL_GAIN}")]
    pad, head = 4, 22
    grid = Image.new("RGB", (len(headers) * (cell + pad) + pad, head + len(keys) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(13)
    for c, text in enumerate(headers):
        draw.text((pad + c * (cell + pad) + cell // 2, head // 2), text, fill="black", font=font, anchor="mm")
    for r, key in enumerate(keys):
        tiles = [clean[key]]
        for name in protected:
            p = sets[name][key]
            residual = ((p.int() - clean[key].int()).abs() * RESIDUAL_GAIN).clamp(0, 255).to(torch.uint8)
            tiles += [p, residual]
        for c, tile in enumerate(tiles):
            image = Image.fromarray(tile.permute(1, 2, 0).numpy(), "RGB")
            # Nearest upscaling shows the perturbation's pixels as they are; no smoothing.
            image = image.resize(_fit(image.size, cell), Image.Resampling.NEAREST)
            grid.paste(image, (pad + c * (cell + pad), head + pad + r * (cell + pad)))
    return grid


def _fit(size: tuple[int, int], cell: int) -> tuple[int, int]:
    w, h = size
    scale = cell / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def jpeg_curves(victims: list[dict[str, Any]], dataset: str) -> dict[str, list[tuple[int, float]]]:
    """method -> [(quality, accuracy)] for the default victim; the no-JPEG row is not a quality and is left out."""
    victim = _default_victim(victims)
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for v in _pick(victims, dataset=dataset, victim=victim, group="jpeg"):
        curves[v["tags"]["method"]].append((int(v["tags"]["attack_config"]["jpeg_quality"]), float(v["final_acc"])))
    return {m: sorted(points) for m, points in sorted(curves.items(), key=lambda kv: method_key(kv[0])) if points}


def jpeg_figure(curves: dict[str, list[tuple[int, float]]], chance: float, title: str) -> tuple[bytes, str]:
    """The curve as PNG (matplotlib) or, without matplotlib, as a hand-drawn SVG. Returns (data, mime)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _jpeg_svg(curves, chance, title).encode("utf-8"), "image/svg+xml"
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    for method, points in curves.items():
        ax.plot([q for q, _ in points], [a for _, a in points], marker="o", label=method)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.1f}%")
    ax.set_xlabel("JPEG quality of the training set")
    ax.set_ylabel("clean-test accuracy % (lower = better)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue(), "image/png"


def _jpeg_svg(curves: dict[str, list[tuple[int, float]]], chance: float, title: str) -> str:
    width, height, left, bottom, top, right = 520, 360, 60, 50, 30, 120
    qs = sorted({q for points in curves.values() for q, _ in points}) or [0, 100]
    q0, q1 = min(qs), max(qs) if max(qs) > min(qs) else min(qs) + 1

    def xy(q: float, acc: float) -> tuple[float, float]:
        x = left + (q - q0) / (q1 - q0) * (width - left - right)
        return x, height - bottom - acc / 100 * (height - bottom - top)

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">'
    ]
    parts.append(f'<text x="{width / 2}" y="16" text-anchor="middle">{html.escape(title)}</text>')
    x0, y0 = xy(q0, 0)
    x1, y1 = xy(q1, 100)
    parts.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="black"/>')
    for acc in range(0, 101, 20):
        _, y = xy(q0, acc)
        parts.append(f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{acc}</text>')
    for q in qs:
        x, _ = xy(q, 0)
        parts.append(f'<text x="{x}" y="{y0 + 16}" text-anchor="middle">{q}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{height - 10}" text-anchor="middle">JPEG quality</text>')
    _, yc = xy(q0, chance)
    parts.append(f'<line x1="{x0}" y1="{yc}" x2="{x1}" y2="{yc}" stroke="grey" stroke-dasharray="4 3"/>')
    for i, (method, points) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(q, a) for q, a in points))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{x1 + 8}" y="{y1 + 14 * (i + 1)}" fill="{colour}">{html.escape(method)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_figures(results: Results, datasets: list[str], samples: int) -> list[Figure]:
    figures = []
    for sweep in results.sweeps:
        data = sweep.get("data", {})
        protected = {
            name: m["train"]
            for name, m in sweep.get("methods", {}).items()
            if name != "clean" and Path(m["train"], "sizes.json").is_file()
        }
        clean = data.get("clean_train", "")
        if not protected or not Path(clean, "sizes.json").is_file():
            continue
        grid = picture_grid(clean, protected, samples)
        if grid is not None:
            name = f"grid_{sweep['name']}.png"
            caption = f"Clean, protected and residual |x' − x| × {RESIDUAL_GAIN} ({data.get('dataset', '')}, training images)."
            figures.append(Figure(f"Protected examples — {sweep['name']}", name, _png(grid), "image/png", caption))
    for dataset in datasets:
        curves = jpeg_curves(results.victims, dataset)
        if not curves:
            continue
        rows = _pick(results.victims, dataset=dataset)
        data, mime = jpeg_figure(curves, rows[0]["chance"], f"Robustness to JPEG compression ({dataset})")
        ext = "png" if mime == "image/png" else "svg"
        figures.append(
            Figure(
                f"JPEG quality curve — {dataset}",
                f"jpeg_{dataset}.{ext}",
                data,
                mime,
                "Lower is better; dashed: chance.",
            )
        )
    return figures


# ------------------------------------------------------------------------------------------------------------ writers


def markdown_table(table: Table) -> str:
    lines = [
        f"### {table.title}",
        "",
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join(["---"] * len(table.columns)) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines) + "\n"


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    note = f"<p class='note'>{html.escape(table.note)}</p>" if table.note else ""
    return (
        f"<h3>{html.escape(table.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"
    )


def html_figure(fig: Figure) -> str:
    if fig.mime == "image/svg+xml":
        body = fig.data.decode("utf-8")
    else:
        body = (
            f"<img alt='{html.escape(fig.title)}' src='data:{fig.mime};base64,{base64.b64encode(fig.data).decode()}'/>"
        )
    return (
        f"<figure><h3>{html.escape(fig.title)}</h3>{body}<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
    )


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}.note{color:#666;font-size:0.9em}
figure{margin:1em 0}img{max-width:100%;image-rendering:pixelated}"""


def build_sections(results: Results, samples: int) -> tuple[list[tuple[str, list[Table]]], list[Figure]]:
    datasets = sorted({v["tags"].get("dataset", "") for v in results.victims})
    sections: list[tuple[str, list[Table]]] = []
    sections.append(("Effectiveness", [t for t in [effectiveness_table(results.victims)] if t]))
    sections.append(("Goals", [t for t in [goals_table(results.victims)] if t]))
    sections.append(
        (
            "Transferability",
            [t for t in [*(victims_table(results.victims, d) for d in datasets), datasets_table(results.victims)] if t],
        )
    )
    sections.append(("Robustness", [t for d in datasets for t in robustness_tables(results.victims, d)]))
    sections.append(("Image quality", [t for t in [quality_table(results.quality)] if t]))
    sections.append(("Efficiency", [t for t in [time_table(results)] if t]))
    return [(title, tables) for title, tables in sections if tables], build_figures(results, datasets, samples)


def write_report(results_dir: str | Path, out_dir: str | Path, samples: int = 4) -> tuple[Path, Path]:
    results = collect(results_dir)
    if not results.victims and not results.quality and not results.baselines:
        raise ValueError(f"no evaluation results (JSON with a 'kind') under {results_dir}")
    sections, figures = build_sections(results, samples)
    out = Path(out_dir)
    for fig in figures:
        atomic_write_bytes(out / "figures" / fig.name, fig.data)
    intro = (
        "Clean-test accuracy (%) of victims trained from scratch on the protected training set and tested on clean "
        "test images: lower is better protection; ×: ratio to chance (100/K). "
        f"{len(results.victims)} victim runs from `{results_dir}`."
    )
    md = ["# Segue evaluation report", "", intro, ""]
    page = [
        f"<!doctype html><meta charset='utf-8'><title>Segue evaluation report</title><style>{CSS}</style>",
        "<h1>Segue evaluation report</h1>",
        f"<p>{html.escape(intro)}</p>",
    ]
    for title, tables in sections:
        md += [f"## {title}", ""] + [markdown_table(t) for t in tables]
        page += [f"<h2>{html.escape(title)}</h2>"] + [html_table(t) for t in tables]
    if figures:
        md += ["## Figures", ""]
        page.append("<h2>Figures</h2>")
        for fig in figures:
            md += [f"### {fig.title}", "", f"![{fig.title}](figures/{fig.name})", "", f"_{fig.caption}_", ""]
            page.append(html_figure(fig))
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_text(html_path, "\n".join(page))
    return md_path, html_path


# ---------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="folder holding evaluation results (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for report.md, report.html and figures/")
    parser.add_argument("--samples", type=int, default=4, help="samples in each picture grid")


def run(args: argparse.Namespace) -> int:
    md_path, html_path = write_report(args.results, args.out, args.samples)
    console.print(f"[bold]report[/]: {md_path} and {html_path}")
    return 0


__all__ = ["Results", "Table", "collect", "jpeg_curves", "picture_grid", "write_report"]
