"""The site file: the `SiteConfig` dataclass (schema and validation) and `load_site`.

A site file (``configs/sites/*.yaml``) says how many nodes and GPUs a stage gets, which partition/account/QOS/time
limits to ask Slurm for, where shards and outputs live, how to set up the environment on a node (modules, conda,
container) and which NCCL variables to export. Every problem is a ``ValueError`` naming the key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segue_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "launch" / "slurm"
NODE_LAUNCHER = "launch/slurm/node_launch.sh"  # relative to the site's workdir, where the job runs

STAGES = ("shards", "cluster", "train", "protect", "evaluate")
# Stages run as one accelerate launcher per node; the others are one process on one node.
DISTRIBUTED_MODULES = {"cluster": "segue_dist.cluster", "train": "segue_dist.train", "protect": "segue_dist.protect"}
# One-pass stages assign whole shards to (rank, loader worker) statically; a shard set smaller than that leaves
# workers (or whole GPUs) idle for the entire stage.
ONE_PASS_STAGES = ("cluster", "protect")
SCHEDULERS = ("slurm", "local")
# Slurm --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or no limit).
SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PORT_BASE, PORT_SPAN = 20000, 20000  # main_process_port 0 on Slurm: 20000 + job id % 20000, the same on every node


def _check_time(value: str, key: str) -> None:
    if value.upper() not in ("UNLIMITED", "INFINITE") and not SLURM_TIME.match(value):
        raise ValueError(f"{key} {value!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")


def _check_sbatch_options(options: list[str], key: str) -> None:
    for option in options:
        if not option.startswith("--") or "\n" in option:
            raise ValueError(f"{key}: {option!r} must be one long sbatch option like --exclusive or --mem=0")


@dataclass
class StageConfig:
    """Resources of one stage. 0 / -1 / "" mean "the default for this stage" (see `plan_stage`)."""

    time: str = "04:00:00"
    nodes: int = 0  # 0 = every site node for cluster/train/protect; shards and evaluate always use one
    gpus_per_node: int = -1  # -1 = the site's for cluster/train/protect, 0 for shards, 1 for evaluate
    cpus_per_task: int = 0  # 0 = the site's cpus_per_task
    accelerate_config: str = ""  # "" = the site's accelerate_config
    sbatch: list[str] = field(default_factory=list)  # extra sbatch options for this stage only

    def __post_init__(self) -> None:
        _check_time(self.time, "time")
        for key in ("nodes", "cpus_per_task"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = the stage default), got {getattr(self, key)}")
        if self.gpus_per_node < -1:
            raise ValueError(f"gpus_per_node must be >= 0 (or -1 = the stage default), got {self.gpus_per_node}")
        _check_sbatch_options(self.sbatch, "sbatch")


def _stage(**kwargs: Any) -> Any:
    return field(default_factory=lambda: StageConfig(**kwargs))


@dataclass
class StagesConfig:
    shards: StageConfig = _stage(time="04:00:00")
    cluster: StageConfig = _stage(time="04:00:00")
    train: StageConfig = _stage(time="1-00:00:00")
    protect: StageConfig = _stage(time="08:00:00")
    evaluate: StageConfig = _stage(time="12:00:00")


@dataclass
class PathsConfig:
    """Where things live. Relative paths are relative to ``workdir``; ``$VAR`` and ``~`` are expanded."""

    workdir: str = "."  # the segue-dist checkout the job runs in (configs/ and launch/ are found there)
    raw: str = "data/raw"  # identity folders or tars the shards stage reads
    shards: str = "shards/dataset"  # a shard set: train/ and test/ split folders
    outputs: str = "runs"  # cluster/, train/, protected/ go here
    logs: str = "runs/logs"  # Slurm output files and rendered batch scripts


@dataclass
class EnvConfig:
    setup: list[str] = field(default_factory=list)  # shell lines run before a stage: module load, conda activate
    container: str = ""  # command prefix on every node, e.g. "apptainer exec --nv /images/segue.sif"
    vars: dict[str, Any] = field(default_factory=dict)  # exported variables (NCCL_*, OMP_NUM_THREADS, ...)

    def __post_init__(self) -> None:
        for name, value in self.vars.items():
            if not isinstance(name, str) or not ENV_NAME.match(name):
                raise ValueError(f"vars: {name!r} is not a valid environment variable name")
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError(f"vars.{name}: expected a string or number, got {value!r}")
        self.vars = {name: _env_value(value) for name, value in self.vars.items()}
        for line in self.setup:
            if not isinstance(line, str) or "\n" in line:
                raise ValueError(f"setup: each entry must be one shell line, got {line!r}")


def _env_value(value: Any) -> str:
    if isinstance(value, bool):  # YAML `true` exported as 1, the way C libraries (NCCL) read flags
        return "1" if value else "0"
    return str(value)


@dataclass
class SiteConfig:
    name: str = ""
    scheduler: str = "slurm"  # slurm | local (no scheduler: every "node" is a launcher on this machine)
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int = 0  # ranks per node; 0 = gpus_per_node (1 on a CPU-only site)
    cpus_per_task: int = 8  # cores for the one task per node (its ranks and their loader workers)
    mem: str = ""  # sbatch --mem per node ("0" = all of it); "" = the partition's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    sbatch: list[str] = field(default_factory=list)  # extra sbatch options for every stage, e.g. --exclusive
    accelerate_config: str = "configs/accelerate/multi_node.yaml"
    main_address: str = ""  # local sites: where node 0's rendezvous listens (127.0.0.1); Slurm: the first node
    main_process_port: int = 0  # 0 = 20000 + job id % 20000 on Slurm, a free port on a local site
    loader_workers: int = 4  # loader worker processes per rank
    paths: PathsConfig = field(default_factory=PathsConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)

    def __post_init__(self) -> None:
        if not SITE_NAME.match(self.name):
            raise ValueError(f"name must be a non-empty word (letters, digits, _ . -), got {self.name!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for key in ("nodes", "cpus_per_task"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "procs_per_node", "loader_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.gpus_per_node and self.procs_per_node not in (0, self.gpus_per_node):
            raise ValueError(
                f"procs_per_node ({self.procs_per_node}) must equal gpus_per_node ({self.gpus_per_node}): "
                "one rank per GPU (set gpus_per_node to use fewer)"
            )
        if self.main_process_port and not 1024 <= self.main_process_port <= 65535:
            raise ValueError(f"main_process_port must be 0 (automatic) or 1024..65535, got {self.main_process_port}")
        self._check_main_address()
        _check_sbatch_options(self.sbatch, "sbatch")
        for stage in STAGES:
            nodes = getattr(self.stages, stage).nodes
            if stage not in DISTRIBUTED_MODULES and nodes > 1:
                raise ValueError(f"stages.{stage}.nodes: {stage} is one process on one node, got {nodes}")
            if nodes > self.nodes:
                raise ValueError(f"stages.{stage}.nodes ({nodes}) exceeds the site's nodes ({self.nodes})")

    def _check_main_address(self) -> None:
        if self.scheduler == "slurm" and self.main_address:
            raise ValueError("main_address is for local sites; a Slurm job rendezvouses on the first allocated node")
        if self.scheduler == "local" and self.main_address and self.main_address != "localhost":
            try:
                loopback = ipaddress.ip_address(self.main_address).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    f"main_address {self.main_address!r}: a local site runs every node's launcher on this machine, "
                    "so it must be a loopback address (127.0.0.1)"
                )


def load_site(path: str | Path, overrides: Sequence[str] = ()) -> SiteConfig:
    """Read and validate a site file; any problem is one ConfigError line that names the file and the key."""
    try:
        return load_config(SiteConfig, path, overrides)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{SiteConfig.__name__}: ")  # the key is already in the message
        raise ConfigError(f"{path}: {message}") from None
