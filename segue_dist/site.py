"""`segue site`: describe a cluster (or workstation) once, check it, and launch pipeline stages on it.

    segue site check  configs/sites/example_slurm.yaml [--stage train] [--set key=value ...]
    segue site submit configs/sites/example_slurm.yaml train [--dry-run] [--set key=value ...] [--] [stage args ...]

A site file (``configs/sites/*.yaml``, the `SiteConfig` dataclass) says how many nodes and GPUs a stage gets, which
partition/account/QOS/time limits to ask Slurm for, where shards and outputs live, how to set up the environment on a
node (modules, conda, container) and which NCCL variables to export.

``check`` validates the site file and each stage's Accelerate config, counts the shards each stage will read, and
prints the per-node commands. ``submit`` renders ``launch/slurm/<stage>.sbatch`` with the site's ``#SBATCH`` lines and
environment and hands it to ``sbatch`` (``--dry-run`` prints it instead); on a ``scheduler: local`` site it runs the
per-node launchers on this machine (one launcher per "node", the localhost rehearsal of a multi-node job).

Rank variables are never computed here or in the batch script: ``launch/slurm/node_launch.sh`` computes
``--machine_rank $SLURM_NODEID`` and the main address on each node, inside the ``srun`` step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segue_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
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


# ----------------------------------------------------------------------------------------------------------- config


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


# ------------------------------------------------------------------------------------------------------ stage plans


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


VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(text: str) -> str:
    """``~`` and ``$VAR``/``${VAR}`` from this environment (``$USER`` even where only the passwd entry has it).

    Paths are expanded where `segue site` runs, not on the nodes: ``#SBATCH --output`` would take a ``$VAR``
    literally. An unset variable stays as written; `check_paths` reports it.
    """
    env = {**os.environ}
    env.setdefault("USER", getpass.getuser())
    return VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), os.path.expanduser(text))


def site_path(site: SiteConfig, name: str) -> Path:
    """A ``paths.<name>`` entry, expanded, relative paths taken from the workdir."""
    workdir = Path(expand(site.paths.workdir))
    if name == "workdir":
        return workdir
    path = Path(expand(getattr(site.paths, name)))
    return path if path.is_absolute() else workdir / path


def in_workdir(site: SiteConfig, relative: str) -> Path:
    """A repo-relative file (an Accelerate or DeepSpeed config) as the job will see it.

    Off the cluster the site's workdir usually does not exist here; this checkout stands in for it then, so the
    configs you are about to deploy are still checked.
    """
    path = Path(expand(relative))
    if path.is_absolute():
        return path
    workdir = site_path(site, "workdir")
    return (workdir if workdir.is_dir() else REPO) / path


def train_split(site: SiteConfig) -> Path:
    return site_path(site, "shards") / "train"


# --------------------------------------------------------------------------------------------------------- commands


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


# ----------------------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning
    where: str  # the site-file key or the path it is about
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.message}"


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


def check_accelerate(site: SiteConfig, plan: StagePlan) -> list[Finding]:
    """Load the stage's Accelerate config with Accelerate's own loader, then check it can run this plan."""
    key, path = plan.accelerate_key, in_workdir(site, plan.accelerate_config)
    if not path.is_file():
        return [Finding("error", key, f"{path} not found")]
    try:
        cfg = load_accelerate_config(path)
    except Exception as exc:  # noqa: BLE001 - Accelerate raises ValueError, TypeError, KeyError, yaml errors
        return [Finding("error", key, f"{path}: not a valid Accelerate config: {' '.join(str(exc).split())}")]
    return accelerate_findings(cfg, plan, key, str(path), site)


def load_accelerate_config(path: Path) -> Any:
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


def accelerate_findings(
    cfg: Any, plan: StagePlan, key: str, path: str, site: SiteConfig | None = None
) -> list[Finding]:
    """Problems that would make this Accelerate config run the plan wrongly (or hang) on this site."""
    kind = getattr(cfg.distributed_type, "value", str(cfg.distributed_type))
    out: list[Finding] = []

    def error(message: str) -> None:
        out.append(Finding("error", key, f"{path}: {message}"))

    def warn(message: str) -> None:
        out.append(Finding("warning", key, f"{path}: {message}"))

    if kind not in ("NO", "MULTI_GPU", "DEEPSPEED"):
        error(f"distributed_type {kind} is not supported (use MULTI_GPU, or DEEPSPEED for train)")
    if kind == "NO" and plan.world_size > 1:
        error(f"distributed_type NO starts one process, the {plan.stage} stage needs {plan.world_size}")
    if kind == "DEEPSPEED" and plan.stage != "train":
        error(f"DeepSpeed is for the train stage only, not {plan.stage}")
    if cfg.use_cpu and plan.gpus_per_node:
        error(f"use_cpu: true, but the {plan.stage} stage has {plan.gpus_per_node} GPUs per node")
    if not any(f.level == "error" for f in out):  # the simulation would only repeat an error found above
        out += launch_findings(Path(path), plan, key)
    if kind == "DEEPSPEED":
        ds_file = (cfg.deepspeed_config or {}).get("deepspeed_config_file", "")
        ds_path = in_workdir(site, ds_file) if site is not None else Path(ds_file)
        if not ds_file:
            error("DEEPSPEED without deepspeed_config.deepspeed_config_file (segue_dist.train reads that JSON)")
        elif site is not None and not ds_path.is_file():
            error(f"deepspeed_config_file {ds_path} not found")
    if (cfg.num_machines, cfg.num_processes) != (plan.nodes, plan.world_size) and plan.world_size > 1:
        warn(
            f"says {cfg.num_machines} machine(s) x {cfg.num_processes} processes; the launcher passes "
            f"--num_machines {plan.nodes} --num_processes {plan.world_size} for this site"
        )
    if cfg.gpu_ids not in (None, "all"):
        warn(f"gpu_ids {cfg.gpu_ids} restricts the GPUs each node uses")
    if str(cfg.mixed_precision or "no") != "no":
        warn(f"mixed_precision {cfg.mixed_precision}: segue_dist autocasts to bf16 itself on GPU (precision=)")
    return out


@dataclass(frozen=True)
class SimulatedLaunch:
    """What `accelerate launch` would hand to torchrun for one node, from Accelerate's own argument processing."""

    launcher: str  # torchrun | deepspeed-runner (pdsh/ssh into a hostfile) | single-process
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str


def simulate_launch(config: Path, plan: StagePlan, main_ip: str, port: int) -> SimulatedLaunch:
    """Run Accelerate's launch-argument processing (not the launch) on the exact argv a node would use.

    Reading the YAML is not enough: Accelerate ignores some keys (a file's ``same_network`` never applies, since
    the flag defaults to False rather than None) and routes others to launchers that cannot work under Slurm.
    """
    import io

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    from torch.distributed.run import get_rdzv_endpoint

    node = 1 if plan.nodes > 1 else 0  # node 0 would also probe whether the port is free here
    argv = node_command(plan, node, main_ip, port, [], Tools())[2:]
    argv[argv.index("--config_file") + 1] = str(config)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ""
            cmd, _ = prepare_deepspeed_cmd_env(args)
            if cmd is not None:
                return SimulatedLaunch("deepspeed-runner", plan.nodes, 0, "")
        elif args.multi_gpu:
            prepare_multi_gpu_env(args)
        else:
            return SimulatedLaunch("single-process", 1, 1, "")
    # One node: Accelerate leaves nnodes and the endpoint to torchrun's defaults (1, a local static store).
    endpoint = get_rdzv_endpoint(args) if hasattr(args, "rdzv_endpoint") else ""
    return SimulatedLaunch("torchrun", int(getattr(args, "nnodes", 1)), int(args.nproc_per_node), endpoint or "")


def launch_findings(config: Path, plan: StagePlan, key: str) -> list[Finding]:
    main_ip, port = "10.11.12.13", 29555  # stand-ins for node 0's address and the job's port
    try:
        sim = simulate_launch(config, plan, main_ip, port)
    except Exception as exc:  # noqa: BLE001 - a private Accelerate API; its failure must not hide the other checks
        message = f"{config}: could not simulate accelerate launch ({type(exc).__name__}: {exc}); checked the YAML only"
        return [Finding("warning", key, message)]
    if sim.launcher == "single-process" and plan.world_size > 1:
        return [Finding("error", key, f"{config}: accelerate launch would start one process, not {plan.world_size}")]
    if sim.launcher == "deepspeed-runner":
        return [
            Finding(
                "error",
                key,
                f"{config}: on {plan.nodes} nodes Accelerate would start DeepSpeed's pdsh runner (ssh into a hostfile); "
                "set deepspeed_config.deepspeed_multinode_launcher: standard",
            )
        ]
    out = []
    if sim.launcher == "torchrun" and sim.nproc_per_node != plan.procs_per_node:
        out.append(
            Finding(
                "error",
                key,
                f"{config}: torchrun would start {sim.nproc_per_node} ranks per node, not {plan.procs_per_node}",
            )
        )
    if plan.nodes > 1 and sim.rdzv_endpoint != f"{main_ip}:{port}":
        # e.g. a --same_network flag: torchrun's c10d rendezvous then falls back to localhost:29400 on every node.
        message = f"{config}: torchrun would rendezvous at {sim.rdzv_endpoint or 'localhost:29400'}, not at node 0"
        out.append(Finding("error", key, message))
    return out


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


# ----------------------------------------------------------------------------------------------------------- report


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


# ------------------------------------------------------------------------------------------------------- rendering


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


# ------------------------------------------------------------------------------------------------------- submitting


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def local_commands(site: SiteConfig, stage: str, args: list[str], port: int) -> list[list[str]]:
    plan = plan_stage(site, stage)
    tools = Tools.here(site.env.container)
    address = site.main_address or "127.0.0.1"
    commands = [node_command(plan, node, address, port, args, tools) for node in range(plan.nodes)]
    if site.env.setup:  # set-up lines need a shell; the launcher replaces it (exec) so signals reach it
        setup = "; ".join(site.env.setup)
        commands = [["bash", "-c", f"{setup}; exec {shlex.join(cmd)}"] for cmd in commands]
    return commands


def submit_local(site: SiteConfig, stage: str, args: list[str], dry_run: bool) -> int:
    """Run the stage here: one launcher per "node", each node's output in its own log."""
    port = site.main_process_port or free_port()
    commands = local_commands(site, stage, args, port)
    if dry_run:
        for node, cmd in enumerate(commands):
            print(f"# node {node}\n{shlex.join(cmd)}")
        return 0
    env = {**os.environ, **site.env.vars, "PYTHONUNBUFFERED": "1"}
    workdir = site_path(site, "workdir")
    if len(commands) == 1:
        return subprocess.run(commands[0], cwd=workdir, env=env, check=False).returncode
    logs = site_path(site, "logs")
    logs.mkdir(parents=True, exist_ok=True)
    return run_local_nodes(commands, workdir, env, [logs / f"{stage}-node{n}.log" for n in range(len(commands))], port)


def run_local_nodes(commands: list[list[str]], workdir: Path, env: dict[str, str], logs: list[Path], port: int) -> int:
    """Start node 0, wait until its rendezvous store listens, start the others; stop them all if one fails.

    The order matters only on one machine: every launcher here sees 127.0.0.1 as its own address, so a node 1
    started first would take node 0's port as the store server, and node 0's launcher would refuse the port as taken.
    """
    procs: list[subprocess.Popen] = []
    files = [open(log, "w", encoding="utf-8") for log in logs]  # noqa: SIM115 - closed in finally
    try:
        for node, (cmd, log) in enumerate(zip(commands, files, strict=True)):
            # Own session per node: stopping a node stops its launcher's ranks too.
            procs.append(
                subprocess.Popen(
                    cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            if node == 0:
                wait_for_listener(port, procs[0])
        codes = wait_all(procs)
    finally:
        stop(procs)
        for log in files:
            log.close()
    for node, code in enumerate(codes):
        print(f"node {node}: {'ok' if code == 0 else f'FAILED (exit {code})'}; log {logs[node]}")
    for node, code in enumerate(codes):
        if code != 0:
            tail = logs[node].read_text(encoding="utf-8", errors="replace")[-3000:]
            print(f"--- node {node} log tail ---\n{tail}", file=sys.stderr)
    return 0 if all(code == 0 for code in codes) else 1


def port_taken(port: int) -> bool:
    """Whether something listens on the port, probed by binding it (never by connecting to the store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_for_listener(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not port_taken(port):
        time.sleep(0.2)


def wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Exit codes of all nodes; once one node fails the others are stopped (their rendezvous would wait 15 min)."""
    while True:
        codes = [p.poll() for p in procs]  # poll every node: any() would stop at the first still running
        if all(code is not None for code in codes):
            return codes
        if any(code not in (None, 0) for code in codes):
            stop(procs)
            return [p.wait() for p in procs]
        time.sleep(0.5)


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop each node's session (launcher and ranks). A session outlives its reaped leader only while members of
    it remain, and its id is not reused meanwhile, so this signals nothing but what these launchers started."""
    for proc in procs:
        _signal_session(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_session(proc, signal.SIGKILL)
            proc.wait()
    # The ranks (the launchers' children) get the signal too and may outlive their launcher by a moment.
    while any(_session_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        _signal_session(proc, signal.SIGKILL)


def _session_alive(proc: subprocess.Popen) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole session has already exited
        os.killpg(proc.pid, sig)


# ------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="validate a site file and show what each stage would run")
    check.add_argument("site", help="configs/sites/<site>.yaml")
    check.add_argument("--stage", choices=STAGES, action="append", help="check only this stage (repeatable)")
    check.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a site key"
    )
    submit = sub.add_parser(
        "submit",
        help="render launch/slurm/<stage>.sbatch from the site and sbatch it (local sites: run it here)",
        usage="segue site submit SITE STAGE [--dry-run] [--set KEY=VALUE ...] [--] [stage args ...]",
    )
    submit.add_argument("site", help="configs/sites/<site>.yaml")
    submit.add_argument("stage", choices=STAGES)
    submit.add_argument(
        "rest", nargs=argparse.REMAINDER, help="--dry-run / --set KEY=VALUE, then the stage's arguments"
    )


def split_submit_args(rest: list[str]) -> tuple[bool, list[str], list[str]]:
    """(--dry-run?, --set overrides, stage args): submit's own options come first, ``--`` or any other word ends them."""
    dry_run, overrides, i = False, [], 0
    while i < len(rest):
        item = rest[i]
        if item == "--dry-run":
            dry_run = True
        elif item == "--set" and i + 1 < len(rest):
            overrides.append(rest[i + 1])
            i += 1
        elif item.startswith("--set="):
            overrides.append(item.split("=", 1)[1])
        elif item == "--":
            return dry_run, overrides, rest[i + 1 :]
        else:
            break
        i += 1
    return dry_run, overrides, rest[i:]


def report_errors(findings: list[Finding]) -> bool:
    errors = [f for f in findings if f.level == "error"]
    for finding in errors:
        print(f"segue site: error: {finding.line()}", file=sys.stderr)
    return bool(errors)


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        site = load_site(args.site, args.overrides)
        stages = args.stage or list(STAGES)
        findings = check_site(site, stages)
        print_report(site, args.site, stages, findings)
        return 2 if report_errors(findings) else 0
    dry_run, overrides, user_args = split_submit_args(args.rest)
    site = load_site(args.site, overrides)
    findings = check_site(site, [args.stage])
    for finding in findings:
        if finding.level == "warning":
            print(f"segue site: warning: {finding.line()}", file=sys.stderr)
    if report_errors(findings):
        return 2
    stage_argv = stage_args(site, args.stage, user_args)
    if site.scheduler == "slurm":
        return submit_slurm(site, args.site, args.stage, stage_argv, dry_run)
    return submit_local(site, args.stage, stage_argv, dry_run)
