"""`segue site`: describe a cluster (or workstation) once, check it, and launch pipeline stages on it.

    segue site check  configs/sites/example_slurm.yaml [--stage train] [--set key=value ...]
    segue site submit configs/sites/example_slurm.yaml train [--dry-run] [--set key=value ...] [--] [stage args ...]

``check`` validates the site file and each stage's Accelerate config, counts the shards each stage will read, and
prints the per-node commands. ``submit`` renders ``launch/slurm/<stage>.sbatch`` with the site's ``#SBATCH`` lines and
environment and hands it to ``sbatch`` (``--dry-run`` prints it instead); on a ``scheduler: local`` site it runs the
per-node launchers on this machine (one launcher per "node", the localhost rehearsal of a multi-node job).

Modules, one responsibility each:

| module | owns |
|---|---|
| `config` | the site-file schema (`SiteConfig`) and `load_site` |
| `plan` | `plan_stage`: what one stage gets (nodes, ranks, GPUs, cores, Accelerate config) |
| `paths` | ``paths.*`` expansion and the workdir fallback |
| `commands` | default stage arguments and each node's launcher command |
| `findings` | `Finding`, one problem a check found |
| `checks` | paths, hardware, shard counts, cores |
| `accelerate` | the Accelerate config checks (Accelerate's own loader and launch-argument processing) |
| `summary` | the tables `check` prints |
| `slurm` | sbatch rendering and submission |
| `local` | the local supervisor (one launcher per "node" on this machine) |
| `cli` | `add_arguments` / `run` |
"""

from segue_dist.site.accelerate import (
    SimulatedLaunch,
    accelerate_findings,
    check_accelerate,
    launch_findings,
    load_accelerate_config,
    simulate_launch,
)
from segue_dist.site.checks import (
    check_cores,
    check_hardware,
    check_paths,
    check_shard_count,
    check_site,
    count_local_gpus,
    count_shards,
    on_cluster,
)
from segue_dist.site.cli import add_arguments, report_errors, run, split_submit_args
from segue_dist.site.commands import Tools, node_command, stage_args
from segue_dist.site.config import (
    DISTRIBUTED_MODULES,
    NODE_LAUNCHER,
    ONE_PASS_STAGES,
    REPO,
    SCHEDULERS,
    STAGES,
    TEMPLATES,
    EnvConfig,
    PathsConfig,
    SiteConfig,
    StageConfig,
    StagesConfig,
    load_site,
)
from segue_dist.site.findings import Finding
from segue_dist.site.local import (
    free_port,
    local_commands,
    port_taken,
    run_local_nodes,
    stop,
    submit_local,
    wait_all,
    wait_for_listener,
)
from segue_dist.site.paths import VARIABLE, expand, in_workdir, site_path, train_split
from segue_dist.site.plan import StagePlan, plan_stage
from segue_dist.site.slurm import render_sbatch, sbatch_directives, submit_slurm
from segue_dist.site.summary import display_address, display_port, print_report, shards_per_rank

__all__ = [
    "DISTRIBUTED_MODULES",
    "NODE_LAUNCHER",
    "ONE_PASS_STAGES",
    "REPO",
    "SCHEDULERS",
    "STAGES",
    "TEMPLATES",
    "VARIABLE",
    "EnvConfig",
    "Finding",
    "PathsConfig",
    "SimulatedLaunch",
    "SiteConfig",
    "StageConfig",
    "StagePlan",
    "StagesConfig",
    "Tools",
    "accelerate_findings",
    "add_arguments",
    "check_accelerate",
    "check_cores",
    "check_hardware",
    "check_paths",
    "check_shard_count",
    "check_site",
    "count_local_gpus",
    "count_shards",
    "display_address",
    "display_port",
    "expand",
    "free_port",
    "in_workdir",
    "launch_findings",
    "load_accelerate_config",
    "load_site",
    "local_commands",
    "node_command",
    "on_cluster",
    "plan_stage",
    "port_taken",
    "print_report",
    "render_sbatch",
    "report_errors",
    "run",
    "run_local_nodes",
    "sbatch_directives",
    "shards_per_rank",
    "simulate_launch",
    "site_path",
    "split_submit_args",
    "stage_args",
    "stop",
    "submit_local",
    "submit_slurm",
    "train_split",
    "wait_all",
    "wait_for_listener",
]
