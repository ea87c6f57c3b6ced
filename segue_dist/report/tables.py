"""The report's tables (the paper's Tables I, III-VII): methods against datasets, victims, attacks, quality, time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segue_dist.data.shard_writer import STATS_SUFFIX
from segue_dist.evaluate.config import ENROLMENT_GROUP
from segue_dist.protect import MANIFEST_NAME, SETTINGS_NAME
from segue_dist.report.results import (
    Results,
    attack_sort_key,
    chance_text,
    default_victim,
    method_key,
    methods_in,
    pick_rows,
)
from segue_dist.utils.io import read_json

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


def effectiveness_table(victims: list[dict[str, Any]]) -> Table | None:
    """Table I: methods x datasets, default victim, no attack."""
    victim = default_victim(victims)
    plain = pick_rows(victims, victim=victim, group="none")
    if not plain:
        return None
    datasets = sorted({v["tags"]["dataset"] for v in plain})
    cell = {(v["tags"]["method"], v["tags"]["dataset"]): v for v in plain}
    rows = [[m, *[fmt_acc(cell.get((m, d))) for d in datasets]] for m in methods_in(plain)]
    rows.append(["chance", *[chance_text(pick_rows(plain, dataset=d)) for d in datasets]])
    return Table(f"Effectiveness: clean-test accuracy % ↓ ({victim} victim)", ["method", *datasets], rows)


def victims_table(victims: list[dict[str, Any]], dataset: str) -> Table | None:
    """Table IV: methods x victim architectures on one dataset, no attack."""
    plain = pick_rows(victims, dataset=dataset, group="none")
    archs = sorted({v["tags"]["victim"] for v in plain})
    if len(archs) < 2:
        return None
    cell = {(v["tags"]["method"], v["tags"]["victim"]): v for v in plain}
    rows = [[m, *[fmt_acc(cell.get((m, a))) for a in archs]] for m in methods_in(plain)]
    return Table(f"Transfer across victims ({dataset}): clean-test accuracy % ↓", ["method", *archs], rows)


def datasets_table(victims: list[dict[str, Any]]) -> Table | None:
    """Table V: protection made elsewhere (``source`` tag) applied to each dataset."""
    victim = default_victim(victims)
    plain = pick_rows(victims, victim=victim, group="none")
    if not any(v["tags"].get("source") for v in plain):
        return None
    datasets = sorted({v["tags"]["dataset"] for v in plain})
    cell = {(v["tags"]["method"], v["tags"]["dataset"]): v for v in plain}
    sources = {(v["tags"]["method"], v["tags"]["dataset"]): v["tags"].get("source", "") for v in plain}
    rows = []
    for m in methods_in(plain):
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
    victim = default_victim(victims)
    rows_all = pick_rows(victims, dataset=dataset, victim=victim)
    groups = sorted(
        {v["tags"]["group"] for v in rows_all} - {"none", ENROLMENT_GROUP},
        key=lambda g: list(GROUP_TITLES).index(g) if g in GROUP_TITLES else 99,
    )
    baseline = {v["tags"]["method"]: v for v in rows_all if v["tags"]["group"] == "none"}
    tables = []
    for group in groups:
        members = [v for v in rows_all if v["tags"]["group"] == group]
        attacks = {v["tags"]["attack"]: v["tags"].get("attack_config", {}) for v in members}
        names = sorted(attacks, key=lambda a: attack_sort_key(attacks[a]))
        cell = {(v["tags"]["method"], v["tags"]["attack"]): v for v in members}
        labels = [attack_label(a, {**attacks[a], "group": group}) for a in names]
        columns = ["method", *(["no attack"] if baseline else []), *labels]
        rows = [
            [m, *([fmt_acc(baseline.get(m))] if baseline else []), *[fmt_acc(cell.get((m, a))) for a in names]]
            for m in methods_in(members)
        ]
        title = f"Robustness — {GROUP_TITLES.get(group, group)} — {dataset}, {victim}: clean-test accuracy % ↓"
        tables.append(Table(title, columns, rows))
    return tables


def enrolment_note(members: list[dict[str, Any]]) -> str:
    """The enrolment table's note: what the attacker does differently, and this report's own clean-vs-protected
    comparison of the nearest-neighbour attacker (``final_acc``) per recogniser, when the report has both."""
    note = (
        "Unlearnable examples poison what a network *learns* from the photos; an attacker who enrols them with a face "
        "recogniser trained elsewhere (here dlib's descriptor) and identifies new photos by the nearest enrolled face "
        "learns nothing from them."
    )
    comparisons = []
    for recogniser in sorted({v["tags"]["victim"] for v in members}):
        acc = {v["tags"]["method"]: v["final_acc"] for v in members if v["tags"]["victim"] == recogniser}
        protected = [f"{m} {a:.1f}%" for m, a in sorted(acc.items(), key=lambda kv: method_key(kv[0])) if m != "clean"]
        if "clean" in acc and protected:
            comparisons.append(f"{recogniser}: clean {acc['clean']:.1f}% vs {', '.join(protected)}")
    if comparisons:
        note += f" Nearest-neighbour top-1 in this report: {'; '.join(comparisons)}."
    return note + " Trained from scratch: the default victim on the same set, no attack."


def enrolment_table(victims: list[dict[str, Any]], dataset: str) -> Table | None:
    """The pretrained-recogniser attackers (1-NN, class mean, linear probe) per training set, beside the default
    victim trained from scratch on the same set."""
    members = pick_rows(victims, dataset=dataset, group=ENROLMENT_GROUP)
    if not members:
        return None
    victim = default_victim(victims)
    trained = {v["tags"]["method"]: v for v in pick_rows(victims, dataset=dataset, victim=victim, group="none")}
    rows = []
    for v in sorted(members, key=lambda v: (method_key(v["tags"]["method"]), v["tags"]["victim"])):
        scores = v.get("enrolment", {})
        cells = [
            f"{scores[n]:.2f}" if n in scores else "–" for n in ("nearest_neighbour", "class_mean", "linear_probe")
        ]
        rows.append(
            [
                v["tags"]["method"],
                v["tags"]["victim"],
                *cells,
                f"{v['chance']:.2f}",
                fmt_acc(trained.get(v["tags"]["method"])),
            ]
        )
    columns = [
        "method",
        "recogniser",
        "nearest neighbour",
        "class mean",
        "linear probe",
        "chance",
        f"trained: {victim}",
    ]
    title = f"Robustness — enrolment by a pretrained face recogniser — {dataset}: clean-test top-1 % ↓"
    return Table(title, columns, rows, enrolment_note(members))


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
    stats = [read_json(p) for p in sorted(folder.glob(f"*{STATS_SUFFIX}"))]
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
