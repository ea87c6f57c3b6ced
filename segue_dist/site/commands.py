"""The command lines a stage runs: the site's default stage arguments and each node's launcher."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from segue_dist.site.config import DISTRIBUTED_MODULES, SiteConfig
from segue_dist.site.paths import site_path
from segue_dist.site.plan import StagePlan, plan_stage


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _given_key(args: Sequence[str], key: str) -> bool:
    return any(a.split("=", 1)[0].lstrip("-") == key for a in args if "=" in a)


def stage_args(site: SiteConfig, stage: str, user: Sequence[str]) -> list[str]:
    """The user's stage arguments plus the site's defaults for whatever they left out.

    Defaults chain the stages through the site's paths: shards -> <shards>/{train,test}, cluster -> <outputs>/cluster,
    train -> <outputs>/train (the generator), protect -> <outputs>/protected/train. The site's loader_workers wins over
    a config file's, because the site is what knows how many cores a rank has.
    """
    user = list(user)
    shards, outputs = site_path(site, "shards"), site_path(site, "outputs")
    workers = str(site.loader_workers)
    if stage == "shards":
        args = user if user[:1] == ["build"] else ["build", *user]
        cpus = plan_stage(site, "shards").cpus_per_task
        flags = {"--src": str(site_path(site, "raw")), "--out": str(shards), "--workers": str(cpus)}
        return args + [x for f, v in flags.items() if not _given(args, f) for x in (f, v)]
    if stage == "cluster":
        flags = {"--shards": str(shards / "train"), "--out": str(outputs / "cluster"), "--workers": workers}
        return user + [x for f, v in flags.items() if not _given(user, f) for x in (f, v)]
    if stage == "protect":
        flags = {
            "--generator": str(outputs / "train"),
            "--in": str(shards / "train"),
            "--out": str(outputs / "protected" / "train"),
            "--workers": workers,
        }
        return user + [x for f, v in flags.items() if not _given(user, f) for x in (f, v)]
    if stage == "train":
        return _train_args(
            user, {"data.train": str(shards / "train"), "out": str(outputs / "train"), "data.num_workers": workers}
        )
    return user  # evaluate: victim/baseline/quality/sweep take different arguments; nothing to default


def _train_args(user: list[str], defaults: dict[str, str]) -> list[str]:
    """``--config X`` first, then key=value overrides: argparse stops at a flag between two runs of positionals."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(user):
        item = user[i]
        if item.startswith("--") and "=" not in item and i + 1 < len(user):
            flags += [item, user[i + 1]]
            i += 2
            continue
        (flags if item.startswith("--") else overrides).append(item)
        i += 1
    missing = [f"{k}={v}" for k, v in defaults.items() if not _given_key(overrides, k)]
    return flags + missing + overrides


@dataclass(frozen=True)
class Tools:
    """How a command is spelled where it runs: on a cluster node (names on PATH) or here (this venv)."""

    python: str = "python"
    accelerate: str = "accelerate"
    container: tuple[str, ...] = ()

    @classmethod
    def here(cls, container: str = "") -> Tools:
        accelerate = Path(sys.executable).with_name("accelerate")
        return cls(
            sys.executable, str(accelerate) if accelerate.exists() else "accelerate", tuple(shlex.split(container))
        )


def node_command(
    plan: StagePlan, node_rank: int, main_ip: str, port: int | str, args: Sequence[str], tools: Tools
) -> list[str]:
    """One node's launcher. ``launch/slurm/node_launch.sh`` builds exactly this on a Slurm node (tested)."""
    prefix = list(tools.container)
    if not plan.distributed:
        return [*prefix, tools.python, "-m", "segue_dist.cli", plan.stage, *args]
    # c10d for several nodes (the launchers find each other at main_ip:port); static for one, because c10d with a
    # single node would rendezvous on localhost:29400 and collide with any other job on that node.
    return [
        *prefix,
        tools.accelerate,
        "launch",
        "--config_file",
        plan.accelerate_config,
        "--num_machines",
        str(plan.nodes),
        "--num_processes",
        str(plan.world_size),
        "--machine_rank",
        str(node_rank),
        "--main_process_ip",
        main_ip,
        "--main_process_port",
        str(port),
        "--rdzv_backend",
        "c10d" if plan.nodes > 1 else "static",
        "-m",
        DISTRIBUTED_MODULES[plan.stage],
        *args,
    ]
