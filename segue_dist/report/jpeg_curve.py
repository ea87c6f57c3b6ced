"""The JPEG-quality curve (the paper's Fig. 3 (1)): accuracy against the JPEG quality of the training set.

The no-attack row is drawn as its own point at the right of the axis, labelled "none", so the reader sees what JPEG
costs each method. Segue's lines are drawn last, thicker and in a colour no other method uses, so that baselines
with similar accuracies cannot hide them.
"""

from __future__ import annotations

import html
import io
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from segue_dist.report.results import default_victim, method_key, pick_rows

ToPixels = Callable[[float, float], tuple[float, float]]  # (quality, accuracy) -> SVG (x, y)
NONE_LABEL = "none"  # the x tick of the no-attack point
SEGUE_COLOUR = "#d62728"
OTHER_COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f"]  # no red: that is Segue's


@dataclass(frozen=True)
class LineStyle:
    colour: str
    width: float
    marker: str  # matplotlib marker; the SVG draws circles for all, larger for Segue


def jpeg_curves(victims: list[dict[str, Any]], dataset: str) -> dict[str, list[tuple[int, float]]]:
    """method -> [(quality, accuracy)] for the default victim; the no-JPEG row is not a quality: see no_attack_points."""
    victim = default_victim(victims)
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for v in pick_rows(victims, dataset=dataset, victim=victim, group="jpeg"):
        curves[v["tags"]["method"]].append((int(v["tags"]["attack_config"]["jpeg_quality"]), float(v["final_acc"])))
    return {m: sorted(points) for m, points in sorted(curves.items(), key=lambda kv: method_key(kv[0])) if points}


def no_attack_points(victims: list[dict[str, Any]], dataset: str) -> dict[str, float]:
    """method -> accuracy of the default victim with no attack (the curve's "none" point)."""
    victim = default_victim(victims)
    rows = pick_rows(victims, dataset=dataset, victim=victim, group="none")
    return {v["tags"]["method"]: float(v["final_acc"]) for v in rows}


def is_segue(method: str) -> bool:
    return method.startswith("segue")  # `segue` (true labels) and `segue-pseudo`


def draw_order(methods: list[str]) -> list[str]:
    """Baselines first, Segue last: the last line drawn is on top."""
    return sorted(methods, key=is_segue)  # stable: keeps the report's method order within each group


def line_styles(methods: list[str]) -> dict[str, LineStyle]:
    styles, others = {}, iter(OTHER_COLOURS * (1 + len(methods) // len(OTHER_COLOURS)))
    for method in methods:
        if is_segue(method):
            styles[method] = LineStyle(SEGUE_COLOUR, 3.0, "D")
        else:
            styles[method] = LineStyle(next(others), 1.5, "o")
    return styles


def none_x(qualities: list[int]) -> float:
    """Where the "none" point sits: a gap to the right of the highest quality, never on a real quality."""
    q0, q1 = min(qualities), max(qualities)
    return q1 + max(10.0, 0.15 * (q1 - q0))


def jpeg_figure(
    curves: dict[str, list[tuple[int, float]]], chance: float, title: str, none: dict[str, float] | None = None
) -> tuple[bytes, str]:
    """The curve as PNG (matplotlib) or, without matplotlib, as a hand-drawn SVG. Returns (data, mime)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _jpeg_svg(curves, chance, title, none).encode("utf-8"), "image/svg+xml"
    none = none or {}
    qs = sorted({q for points in curves.values() for q, _ in points})
    xn = none_x(qs)
    styles = line_styles(list(curves))
    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    for method in draw_order(list(curves)):
        points, style = curves[method], styles[method]
        xs, ys = [q for q, _ in points], [a for _, a in points]
        ax.plot(xs, ys, color=style.colour, linewidth=style.width, marker=style.marker, label=method, zorder=3)
        if method in none:  # dotted: the step from the highest quality to no JPEG at all
            ax.plot([xs[-1], xn], [ys[-1], none[method]], color=style.colour, linewidth=style.width, linestyle=":")
            ax.plot([xn], [none[method]], color=style.colour, marker=style.marker, markersize=8, zorder=4)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.1f}%")
    ax.set_xticks([*qs, xn], [*map(str, qs), NONE_LABEL])
    ax.set_xlabel("JPEG quality of the training set (none = no attack)")
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


def _jpeg_svg(
    curves: dict[str, list[tuple[int, float]]], chance: float, title: str, none: dict[str, float] | None = None
) -> str:
    none = none or {}
    width, height, left, bottom, top, right = 560, 360, 60, 50, 30, 130
    qs = sorted({q for points in curves.values() for q, _ in points}) or [0, 100]
    q0, q1 = min(qs), none_x(qs)

    def xy(q: float, acc: float) -> tuple[float, float]:
        x = left + (q - q0) / (q1 - q0) * (width - left - right)
        return x, height - bottom - acc / 100 * (height - bottom - top)

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
    for q, label in [*((q, str(q)) for q in qs), (q1, NONE_LABEL)]:
        x, _ = xy(q, 0)
        parts.append(f'<text x="{x}" y="{y0 + 16}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<text x="{(x0 + x1) / 2}" y="{height - 10}" text-anchor="middle">JPEG quality (none = no attack)</text>'
    )
    _, yc = xy(q0, chance)
    parts.append(f'<line x1="{x0}" y1="{yc}" x2="{x1}" y2="{yc}" stroke="grey" stroke-dasharray="4 3"/>')
    styles = line_styles(list(curves))
    for i, method in enumerate(draw_order(list(curves))):
        parts += _svg_line(method, curves[method], none.get(method), styles[method], xy, q1)
        colour = styles[method].colour
        parts.append(f'<text x="{x1 + 8}" y="{y1 + 14 * (i + 1)}" fill="{colour}">{html.escape(method)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_line(
    method: str, points: list[tuple[int, float]], none: float | None, style: LineStyle, xy: ToPixels, xn: float
) -> list[str]:
    """One method's polyline, and its "none" point joined by a dotted segment."""
    colour, width = style.colour, style.width
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(q, a) for q, a in points))
    out = [f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{width}"/>']
    if none is not None:
        (xa, ya), (xb, yb) = xy(*points[-1]), xy(xn, none)
        out.append(
            f'<line x1="{xa:.1f}" y1="{ya:.1f}" x2="{xb:.1f}" y2="{yb:.1f}" stroke="{colour}" stroke-dasharray="2 3"/>'
        )
        r = 5 if is_segue(method) else 3.5
        out.append(f'<circle class="none-point" cx="{xb:.1f}" cy="{yb:.1f}" r="{r}" fill="{colour}"/>')
    return out
