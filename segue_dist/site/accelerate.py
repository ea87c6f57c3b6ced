"""Whether a stage's Accelerate config can run its plan: Accelerate's own loader and launch-argument processing.

Reading the YAML is not enough (see `simulate_launch`), so the checks run the private argument processing of
``accelerate launch`` on the exact argv a node would use; if that API moves, the check degrades to a warning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segue_dist.site.commands import Tools, node_command
from segue_dist.site.config import SiteConfig
from segue_dist.site.findings import Finding
from segue_dist.site.paths import in_workdir
from segue_dist.site.plan import StagePlan


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
