"""Slurm: render ``launch/slurm/<stage>.sbatch`` with the site's ``#SBATCH`` lines and environment, and sbatch it.

Rank variables are never computed here or in the batch script: ``launch/slurm/node_launch.sh`` computes
``--machine_rank $SLURM_NODEID`` and the main address on each node, inside the ``srun`` step.
"""

from __future__ import annotations

import datetime
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

from segue_dist.config import ConfigError
from segue_dist.site.config import TEMPLATES, SiteConfig
from segue_dist.site.paths import site_path
from segue_dist.site.plan import StagePlan, plan_stage


def sbatch_directives(site: SiteConfig, plan: StagePlan) -> list[str]:
    """The #SBATCH lines for one stage, from the site file."""
    lines = [
        f"--job-name=segue-{plan.stage}-{site.name}",
        f"--nodes={plan.nodes}",
        "--ntasks-per-node=1",  # one launcher per node; accelerate forks the ranks
        f"--cpus-per-task={plan.cpus_per_task}",
    ]
    if plan.gpus_per_node:
        lines.append(f"--gpus-per-node={plan.gpus_per_node}")
    optional = {"mem": site.mem, "partition": site.partition, "account": site.account, "qos": site.qos}
    lines += [f"--{option}={value}" for option, value in {**optional, "constraint": site.constraint}.items() if value]
    lines.append(f"--time={plan.time}")
    lines.append(f"--output={site_path(site, 'logs')}/%x-%j.out")
    lines += list(plan.sbatch)
    return [f"#SBATCH {line}" for line in lines]


def _option_name(directive: str) -> str:
    return directive.split()[1].split("=", 1)[0] if len(directive.split()) > 1 else ""


def render_sbatch(site: SiteConfig, source: str, stage: str, args: Sequence[str]) -> str:
    """The batch script: the site's #SBATCH lines and environment, then the body of launch/slurm/<stage>.sbatch."""
    plan = plan_stage(site, stage)
    template = (TEMPLATES / f"{stage}.sbatch").read_text(encoding="utf-8").splitlines()
    header = sbatch_directives(site, plan)
    ours = {_option_name(line) for line in header}
    # The template's own directives are defaults for submitting it by hand; the site's replace them. Every
    # directive must come before the first command, or sbatch silently ignores it.
    kept = [line for line in template if line.startswith("#SBATCH") and _option_name(line) not in ours]
    body = [line for line in template[1:] if not line.startswith("#SBATCH")]
    env = {
        "SEGUE_SITE": site.name,
        "SEGUE_WORKDIR": str(site_path(site, "workdir").resolve()),
        "SEGUE_PROCS_PER_NODE": str(plan.procs_per_node),
        "SEGUE_ACCELERATE_CONFIG": plan.accelerate_config,
        "SEGUE_MAIN_PORT": str(site.main_process_port),
        "SEGUE_CONTAINER": site.env.container,
        **site.env.vars,
    }
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = [
        "#!/bin/bash",
        *header,
        *kept,
        f"# Rendered by `segue site submit {source} {stage}` on {stamp}; body: launch/slurm/{stage}.sbatch.",
        "# No rank variable is expanded in this script: launch/slurm/node_launch.sh computes them on each node.",
        "set -eo pipefail",
        *(
            f"export {name}={shlex.quote(value)}"
            for name, value in env.items()
            if value != "" or name == "SEGUE_CONTAINER"
        ),
        *(
            ["# site environment set-up (runs on the first node; srun passes the environment on)"]
            if site.env.setup
            else []
        ),
        *site.env.setup,
        "# stage arguments (the site's defaults for what was not given)",
        "set -- " + " ".join(shlex.quote(a) for a in args),
        *body,
    ]
    return "\n".join(lines) + "\n"


def submit_slurm(site: SiteConfig, source: str, stage: str, args: list[str], dry_run: bool) -> int:
    script = render_sbatch(site, source, stage, args)
    if dry_run:
        sys.stdout.write(script)
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found on PATH: submit from a Slurm login node (or use --dry-run)")
    logs = site_path(site, "logs")
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create --output's folder; the job would vanish
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = logs / f"segue-{stage}-{site.name}-{stamp}.sbatch"
    path.write_text(script, encoding="utf-8")
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"segue site: error: sbatch {path}: {' '.join(result.stderr.split())}", file=sys.stderr)
        return result.returncode
    job = result.stdout.strip().split(";")[0]
    print(f"submitted {stage} on {site.name} as job {job}: {path}; log {logs}/segue-{stage}-{site.name}-{job}.out")
    return 0
