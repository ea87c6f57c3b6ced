"""Collecting `segue evaluate` result JSONs (`collect`) and selecting and ordering their rows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segue_dist.data.shard_writer import STATS_SUFFIX
from segue_dist.evaluate.config import ENROLMENT_GROUP
from segue_dist.utils.io import read_json
from segue_dist.utils.progress import console

DEFAULT_VICTIM = "resnet18"  # the defender's surrogate and the paper's default attacker
METHOD_ORDER = ("clean", "segue", "ue", "lsp", "random")


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
        if path.name.endswith(STATS_SUFFIX) or path.name in ("sizes.json", "labels.json"):
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


def attack_sort_key(attack: dict[str, Any]) -> tuple:
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


def pick_rows(victims: list[dict[str, Any]], **tags: Any) -> list[dict[str, Any]]:
    out = []
    for v in victims:
        t = v["tags"]
        if all((t.get(k) == val) for k, val in tags.items()):
            out.append(v)
    return out


def default_victim(victims: list[dict[str, Any]]) -> str:
    """The victim of the main tables: resnet18 when present, else the first trained one (not an enrolment row)."""
    names = {v["tags"]["victim"] for v in victims if v["tags"].get("group") != ENROLMENT_GROUP}
    return DEFAULT_VICTIM if DEFAULT_VICTIM in names or not names else sorted(names)[0]


def methods_in(victims: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({v["tags"]["method"] for v in victims}, key=method_key)


def chance_text(victims: list[dict[str, Any]]) -> str:
    values = sorted({round(v["chance"], 2) for v in victims})
    return ", ".join(f"{c:.2f}" for c in values)
