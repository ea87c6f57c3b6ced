"""Segue against the evaluation goals: the ratio-to-chance bound each row is held to, and the goals table."""

from __future__ import annotations

from typing import Any

from segue_dist.report.results import METHOD_ORDER, method_key
from segue_dist.report.tables import Table, fmt_acc

# The evaluation goals for Segue, as a ratio to chance: no attack on any victim, and the attacks that undo weaker
# protections (JPEG-10, grayscale, ISS, adversarial training at 4/255, training at 1/2 and 1/4 resolution).
GOAL_PLAIN = 1.2
GOAL_ROBUST = 1.5


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
