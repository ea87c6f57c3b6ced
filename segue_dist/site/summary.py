"""The tables `segue site check` prints: each stage's resources and shards, and each node's launcher."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence

from segue_dist.config import ConfigError
from segue_dist.site.checks import count_shards
from segue_dist.site.commands import Tools, node_command, stage_args
from segue_dist.site.config import PORT_BASE, PORT_SPAN, SiteConfig
from segue_dist.site.findings import Finding
from segue_dist.site.paths import site_path, train_split
from segue_dist.site.plan import StagePlan, plan_stage


def shards_per_rank(site: SiteConfig, plan: StagePlan) -> str:
    split = train_split(site)
    if plan.stage == "shards":
        return f"writes {site_path(site, 'shards')}"
    if plan.stage == "evaluate":
        return "as given (--train/--test)"
    if not split.is_dir():
        return "not built yet"
    try:
        shards, _ = count_shards(split)
    except ConfigError:
        return "unreadable sizes.json"
    if plan.stage == "train":
        return f"{shards} shards; every rank resamples all"
    low, high = shards // plan.world_size, -(-shards // plan.world_size)
    per_rank = str(low) if low == high else f"{low}-{high}"
    return f"{shards} shards; {per_rank} per rank (static)"


def display_address(site: SiteConfig) -> str:
    if site.scheduler == "local":
        return site.main_address or "127.0.0.1"
    return "<first host of $SLURM_JOB_NODELIST>"


def display_port(site: SiteConfig) -> str:
    if site.main_process_port:
        return str(site.main_process_port)
    return "<free port>" if site.scheduler == "local" else f"<{PORT_BASE} + $SLURM_JOB_ID % {PORT_SPAN}>"


def print_report(site: SiteConfig, source: str, stages: Sequence[str], findings: list[Finding]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, shutil.get_terminal_size((160, 40)).columns))
    summary = Table(
        title=f"site {site.name} ({source}): {site.scheduler}, {site.nodes} node(s) x {site.gpus_per_node} GPU(s)"
    )
    for column in (
        "stage",
        "nodes",
        "ranks/node",
        "world",
        "GPUs/node",
        "CPUs/node",
        "time",
        "accelerate config",
        "shards",
    ):
        summary.add_column(column)
    commands = Table(title="per-node launchers (rank variables are computed on each node)")
    for column in ("stage", "node", "command"):
        commands.add_column(column, overflow="fold")
    for stage in stages:
        plan = plan_stage(site, stage)
        summary.add_row(
            stage,
            str(plan.nodes),
            str(plan.procs_per_node),
            str(plan.world_size),
            str(plan.gpus_per_node),
            str(plan.cpus_per_task),
            plan.time,
            plan.accelerate_config or "-",
            shards_per_rank(site, plan),
        )
        args = stage_args(site, stage, [])
        for node in _shown_nodes(plan.nodes):
            tools = Tools(container=tuple(shlex.split(site.env.container)))
            argv = node_command(plan, node, display_address(site), display_port(site), args, tools)
            label = str(node) if site.scheduler == "local" else f"{node} ($SLURM_NODEID)"
            commands.add_row(stage, label, shlex.join(argv))
    console.print(summary)
    console.print(commands)
    for finding in findings:
        if finding.level == "warning":
            console.print(f"[yellow]warning[/yellow] {finding.line()}", highlight=False, soft_wrap=True)


def _shown_nodes(nodes: int) -> list[int]:
    return list(range(nodes)) if nodes <= 3 else [0, 1, nodes - 1]
