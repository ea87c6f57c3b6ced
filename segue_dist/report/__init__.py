"""`segue report`: the paper's tables and figures from `segue evaluate` results, as Markdown and self-contained HTML.

    segue report --results runs/eval --out reports/eval [--samples 4]

Reads every result JSON under ``--results`` (sweep rows, `evaluate victim` outputs, quality and baseline stats, sweep
``results.json`` files) and writes ``report.md`` (figures beside it under ``figures/``) and ``report.html`` (figures
embedded as base64 PNG, so the one file can be mailed around). Sections follow the paper: effectiveness (Table I),
transfer across victims (Table IV) and datasets (Table V), robustness (Table VI, Fig. 3: JPEG, adversarial training,
augmentations, grayscale / ISS, lower resolution, partial protection), image quality (Table III), time (Table VII), a
picture grid (Fig. 2: rows clean, protected, residual on a per-image symmetric scale) and the JPEG-quality curve (Fig. 3 (1)).

Modules: `results` (collect the JSONs, select and order rows), `tables` (Tables I, III-VII), `goals` (Segue against
the goals), `figures` (picture grid), `jpeg_curve` (Fig. 3 (1)), `render` (Markdown / HTML, `write_report`), `cli`.

Every accuracy is the clean-test accuracy of a victim trained on the protected set (lower = better protection), shown
with its ratio to chance (100/K).
"""

from segue_dist.report.cli import add_arguments, run
from segue_dist.report.figures import Figure, build_figures, load_keys, pick_keys, picture_grid, residual_tile
from segue_dist.report.goals import GOAL_PLAIN, GOAL_ROBUST, goal_for, goals_table
from segue_dist.report.jpeg_curve import _jpeg_svg, jpeg_curves, jpeg_figure, no_attack_points
from segue_dist.report.render import build_sections, html_figure, html_table, markdown_table, write_report
from segue_dist.report.results import DEFAULT_VICTIM, METHOD_ORDER, Results, collect, method_key
from segue_dist.report.tables import (
    GROUP_TITLES,
    Table,
    attack_label,
    datasets_table,
    effectiveness_table,
    enrolment_table,
    fmt_acc,
    quality_table,
    robustness_tables,
    time_table,
    victims_table,
)

# `_jpeg_svg` (the SVG fallback without matplotlib) stays importable from here: tests draw it directly.
__all__ = [
    "DEFAULT_VICTIM",
    "GOAL_PLAIN",
    "GOAL_ROBUST",
    "GROUP_TITLES",
    "METHOD_ORDER",
    "Figure",
    "Results",
    "Table",
    "_jpeg_svg",
    "add_arguments",
    "attack_label",
    "build_figures",
    "build_sections",
    "collect",
    "datasets_table",
    "effectiveness_table",
    "enrolment_table",
    "fmt_acc",
    "goal_for",
    "goals_table",
    "html_figure",
    "html_table",
    "jpeg_curves",
    "jpeg_figure",
    "no_attack_points",
    "load_keys",
    "markdown_table",
    "method_key",
    "pick_keys",
    "picture_grid",
    "residual_tile",
    "quality_table",
    "robustness_tables",
    "run",
    "time_table",
    "victims_table",
    "write_report",
]
