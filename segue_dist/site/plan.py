"""What one stage gets on a site: nodes, ranks, GPUs, cores, time and Accelerate config (`plan_stage`)."""

from __future__ import annotations

from dataclasses import dataclass

from segue_dist.config import ConfigError
from segue_dist.site.config import DISTRIBUTED_MODULES, STAGES, SiteConfig, StageConfig


@dataclass(frozen=True)
class StagePlan:
    """What one stage gets on this site."""

    stage: str
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    cpus_per_task: int
    time: str
    accelerate_config: str  # "" for the single-process stages
    accelerate_key: str  # the site-file key that chose it (for messages)
    sbatch: tuple[str, ...]

    @property
    def distributed(self) -> bool:
        return self.stage in DISTRIBUTED_MODULES

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def plan_stage(site: SiteConfig, stage: str) -> StagePlan:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    cfg: StageConfig = getattr(site.stages, stage)
    if stage in DISTRIBUTED_MODULES:
        nodes = cfg.nodes or site.nodes
        gpus = site.gpus_per_node if cfg.gpus_per_node < 0 else cfg.gpus_per_node
        procs = gpus or site.procs_per_node or 1
        key = f"stages.{stage}.accelerate_config" if cfg.accelerate_config else "accelerate_config"
        accelerate = cfg.accelerate_config or site.accelerate_config
    else:
        # shards is CPU work (decode/encode in worker processes); evaluate trains one victim at a time on one device.
        nodes = 1
        gpus = cfg.gpus_per_node if cfg.gpus_per_node >= 0 else (0 if stage == "shards" else min(1, site.gpus_per_node))
        procs, key, accelerate = 1, "", ""
    cpus = cfg.cpus_per_task or site.cpus_per_task
    return StagePlan(stage, nodes, gpus, procs, cpus, cfg.time, accelerate, key, (*site.sbatch, *cfg.sbatch))
