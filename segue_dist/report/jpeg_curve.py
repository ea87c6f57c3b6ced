"""The JPEG-quality curve (the paper's Fig. 3 (1)): accuracy against the JPEG quality of the training set."""

from __future__ import annotations

import html
import io
from collections import defaultdict
from typing import Any

from segue_dist.report.results import default_victim, method_key, pick_rows


def jpeg_curves(victims: list[dict[str, Any]], dataset: str) -> dict[str, list[tuple[int, float]]]:
    """method -> [(quality, accuracy)] for the default victim; the no-JPEG row is not a quality and is left out."""
    victim = default_victim(victims)
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for v in pick_rows(victims, dataset=dataset, victim=victim, group="jpeg"):
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
