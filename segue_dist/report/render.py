"""Writing the report: Markdown and self-contained HTML (figures embedded as base64) from tables and figures."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from segue_dist.report.figures import Figure, build_figures
from segue_dist.report.goals import goals_table
from segue_dist.report.results import Results, collect
from segue_dist.report.tables import (
    Table,
    datasets_table,
    effectiveness_table,
    enrolment_table,
    quality_table,
    robustness_tables,
    time_table,
    victims_table,
)
from segue_dist.utils.io import atomic_write_bytes, atomic_write_text


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
    robustness = [t for d in datasets for t in robustness_tables(results.victims, d)]
    robustness += [t for d in datasets if (t := enrolment_table(results.victims, d))]
    sections.append(("Robustness", robustness))
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
