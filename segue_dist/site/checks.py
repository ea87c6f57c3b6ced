"""`segue site check`'s checks of paths, hardware, shard counts and cores (Accelerate configs: `accelerate.py`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from segue_dist.config import ConfigError
from segue_dist.site.accelerate import check_accelerate
from segue_dist.site.config import NODE_LAUNCHER, ONE_PASS_STAGES, SiteConfig
from segue_dist.site.findings import Finding
from segue_dist.site.paths import VARIABLE, site_path, train_split
from segue_dist.site.plan import StagePlan, plan_stage


def on_cluster(site: SiteConfig) -> bool:
    """Whether paths can be checked for real: a local site is this machine; a Slurm site is where sbatch is."""
    return site.scheduler == "local" or shutil.which("sbatch") is not None


def check_site(site: SiteConfig, stages: Sequence[str]) -> list[Finding]:
    here = on_cluster(site)
    findings = check_paths(site, stages, here)
    findings += check_hardware(site)
    for stage in stages:
        plan = plan_stage(site, stage)
        if plan.distributed:
            findings += check_accelerate(site, plan)
        findings += check_shard_count(site, plan)
        findings += check_cores(site, plan)
    return list(dict.fromkeys(findings))  # stages sharing one Accelerate config would repeat its findings


def check_paths(site: SiteConfig, stages: Sequence[str], here: bool) -> list[Finding]:
    # Off the cluster (no sbatch) a missing /scratch path says nothing: warn instead of failing.
    hard = "error" if here else "warning"
    off = "" if here else " (checked off-cluster: sbatch is not on PATH here)"
    findings: list[Finding] = []
    for name in ("workdir", "raw", "shards", "outputs", "logs"):
        unset = VARIABLE.search(str(site_path(site, name)))
        if unset:
            findings.append(
                Finding("error", f"paths.{name}", f"{unset.group(0)} is not set here, so it cannot be expanded")
            )
    workdir = site_path(site, "workdir")
    if not workdir.is_dir():
        findings.append(Finding(hard, "paths.workdir", f"{workdir} is not a directory{off}"))
    elif site.scheduler == "slurm" and not (workdir / NODE_LAUNCHER).is_file():
        findings.append(
            Finding(hard, "paths.workdir", f"{workdir / NODE_LAUNCHER} missing: is this a segue-dist checkout?")
        )
    for name in ("outputs", "logs"):
        problem = _not_creatable(site_path(site, name))
        if problem:
            findings.append(Finding(hard, f"paths.{name}", problem + off))
    if "shards" in stages and not site_path(site, "raw").exists():
        findings.append(
            Finding("warning", "paths.raw", f"{site_path(site, 'raw')} does not exist (the shards stage reads it)")
        )
    split = train_split(site)
    if any(s in stages for s in ("cluster", "train", "protect")) and not split.is_dir():
        findings.append(
            Finding(
                "warning",
                "paths.shards",
                f"{split} does not exist yet: build it with the shards stage; shard counts not checked",
            )
        )
    return findings


def _not_creatable(path: Path) -> str:
    """'' when ``path`` is a writable directory or could be created; else why not."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        return "" if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"{path} does not exist and cannot be created ({parent} is not a writable directory)"
    return ""


def check_hardware(site: SiteConfig) -> list[Finding]:
    if site.scheduler != "local" or not site.gpus_per_node:
        return []
    visible = count_local_gpus()
    if visible is None:
        return [Finding("warning", "gpus_per_node", "nvidia-smi not found: cannot count this machine's GPUs")]
    if visible < site.gpus_per_node:
        return [Finding("error", "gpus_per_node", f"site says {site.gpus_per_node} GPUs, this machine shows {visible}")]
    return []


def count_local_gpus() -> int | None:
    """GPUs a local launch would use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists (no torch import)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


def count_shards(split: Path) -> tuple[int, int | None]:
    """(shards, samples or None) of a split folder, from sizes.json when there is one, else from its tars."""
    sizes_file = split / "sizes.json"
    if sizes_file.is_file():
        try:
            sizes = json.loads(sizes_file.read_text(encoding="utf-8"))
            return len(sizes), sum(int(v) for v in sizes.values())
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{sizes_file}: not a shard size map ({exc})") from None
    return len(list(split.glob("*.tar"))), None


def check_shard_count(site: SiteConfig, plan: StagePlan) -> list[Finding]:
    split = train_split(site)
    if not plan.distributed or not split.is_dir():
        return []
    try:
        shards, samples = count_shards(split)
    except ConfigError as exc:
        return [Finding("error", "paths.shards", str(exc))]
    if plan.stage in ONE_PASS_STAGES:
        needed = plan.world_size * max(1, site.loader_workers)
        why = f"world size {plan.world_size} x loader_workers {site.loader_workers}"
    else:
        needed, why = plan.world_size, f"world size {plan.world_size}"
    if shards >= needed:
        return []
    hint = ""
    if samples:
        hint = f"; rebuild with samples_per_shard <= {max(1, samples // needed)}"
    message = f"{split} has {shards} shards, the {plan.stage} stage needs >= {needed} ({why}){hint}"
    if plan.stage in ONE_PASS_STAGES or shards == 0:
        return [Finding("error", "paths.shards", message)]
    # Training resamples shards on every rank, so fewer shards than ranks works; it only concentrates the reads.
    return [Finding("warning", "paths.shards", message + " (training still runs: every rank resamples all shards)")]


def check_cores(site: SiteConfig, plan: StagePlan) -> list[Finding]:
    if not plan.distributed:
        return []
    wanted = plan.procs_per_node * (1 + site.loader_workers)
    if plan.cpus_per_task >= wanted:
        return []
    return [
        Finding(
            "warning",
            "cpus_per_task",
            f"{plan.cpus_per_task} cores per node for {plan.procs_per_node} ranks x (1 + {site.loader_workers} loader "
            f"workers) = {wanted} processes in the {plan.stage} stage",
        )
    ]
