"""Exact resume: the checkpoint of a training run, with both models, both optimisers, every RNG (per rank) and the
data position; written at every epoch end and every ``checkpoint_every`` steps, restored when a run starts again.

DDP: rank 0 writes one pickle-free safetensors + JSON pair (`checkpoints/last.{safetensors,json}`, atomically, through
segue_dist/weights.py), with each rank's distortion RNG and, in multi-process runs, each rank's BatchNorm buffers.
DeepSpeed: each engine writes its own checkpoint format (rank 0's module only); rank 0 adds `rank_buffers` (each
rank's BatchNorm statistics) and, last, `position.json` with the position, the world size and the RNG states. The resume
contract: a run resumed from any checkpoint (epoch end or every `checkpoint_every` steps) with the same world size is
bit-identical to the uninterrupted run; another world size is refused. The position, and the `stop` entry of the
checkpoint a run ended with for good, are `segue_dist/training/run_state.py`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segue_dist.config import ConfigError
from segue_dist.training.config import TrainConfig
from segue_dist.training.runtime import Runner, Runtime, deepspeed_requested
from segue_dist.utils.io import atomic_write_json, read_json
from segue_dist.weights import (
    capture_rng,
    flatten_state,
    load_state,
    load_state_strict,
    restore_rng,
    rng_to_tensors,
    save_state,
    unflatten_state,
)

# A checkpoint's place in the run: {"epoch", "batch", "step"} and, last of a finished run, "stop" (see run_state.py).
Position = dict[str, Any]


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoints"


def save_checkpoint(
    g: Runner, f: Runner, position: Position, rng: torch.Generator, cfg: TrainConfig, rt: Runtime
) -> None:
    """Write the exact-resume state at ``position``. Collective: every rank must call it at the same step."""
    rng_states = gather_rng_states(rng, rt)
    rank_buffers = gather_rank_buffers(f.module, rt)
    ckpt = checkpoint_dir(cfg)
    if rt.deepspeed:
        for runner in (g, f):
            runner.engine.save_checkpoint(str(ckpt / runner.name), tag="last", client_state={})
        if rt.is_main:
            if rank_buffers:  # the engines save rank 0's module only
                save_state(ckpt / "rank_buffers", rank_buffers, {})
            atomic_write_json(
                ckpt / "position.json", {**position, "world_size": rt.world_size, "rng_states": rng_states.tolist()}
            )
        return
    if rt.is_main:
        save_ddp_state(ckpt / "last", g, f, position, rng_states, rank_buffers, rt.world_size)


def save_ddp_state(
    path: Path,
    g: Runner,
    f: Runner,
    position: Position,
    rng_states: torch.Tensor,
    rank_buffers: dict[str, torch.Tensor],
    world_size: int,
) -> None:
    """One safetensors + JSON pair: weights, flattened optimiser states, global RNG, per-rank distortion RNG and
    per-rank BatchNorm buffers; the JSON holds the position, the optimisers' skeletons and the world size."""
    tensors: dict[str, torch.Tensor] = {}
    for name, runner in (("g", g), ("f", f)):
        for key, value in runner.module.state_dict().items():
            tensors[f"{name}.model.{key}"] = value
    skeleton = {
        "g_optim": flatten_state("g.optim", g.base_optimizer.state_dict(), tensors),
        "f_optim": flatten_state("f.optim", f.base_optimizer.state_dict(), tensors),
    }
    rng_tensors, rng_meta = rng_to_tensors(capture_rng())
    tensors.update(rng_tensors)
    tensors["distortion_rng"] = rng_states
    tensors.update(rank_buffers)
    save_state(path, tensors, {"position": position, "optim": skeleton, "rng": rng_meta, "world_size": world_size})


def gather_rng_states(rng: torch.Generator, rt: Runtime) -> torch.Tensor:
    """Every rank's distortion RNG state, stacked (rank order), so each rank resumes its own random stream."""
    state = rng.get_state()
    if rt.world_size == 1:
        return state.unsqueeze(0)
    local = state.to(rt.comm_device)
    gathered = [torch.empty_like(local) for _ in range(rt.world_size)]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).cpu()


def gather_rank_buffers(module: nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """Each rank's own BatchNorm statistics: inside an f epoch they differ by rank until the epoch-end average."""
    out: dict[str, torch.Tensor] = {}
    if rt.world_size == 1:
        return out
    for name, buf in module.named_buffers():
        if not buf.is_floating_point():
            continue
        local = buf.detach().to(rt.comm_device)
        gathered = [torch.empty_like(local) for _ in range(rt.world_size)]
        dist.all_gather(gathered, local)
        for r, value in enumerate(gathered):
            out[f"f.rank{r}.{name}"] = value.cpu()
    return out


def saved_position(cfg: TrainConfig) -> Position | None:
    """The position of the last checkpoint under ``cfg.out`` (either format), read without loading a tensor or
    joining the job; None when there is none."""
    ckpt = checkpoint_dir(cfg)
    if deepspeed_requested(cfg):
        path = ckpt / "position.json"
        return deepspeed_position(read_json(path)) if path.is_file() else None
    path = ckpt / "last.json"
    return read_json(path)["position"] if path.is_file() else None


def load_checkpoint(g: Runner, f: Runner, rng: torch.Generator, cfg: TrainConfig, rt: Runtime) -> Position | None:
    """Restore the last checkpoint into g, f and ``rng``; returns where to continue, or None when there is none.

    Raises ConfigError when the checkpoint was written by another number of processes (an exact resume replays
    each rank's data stream and RNG, which exist only for the same world size).
    """
    ckpt = checkpoint_dir(cfg)
    if rt.deepspeed:
        if not (ckpt / "position.json").is_file():
            return None
        meta = read_json(ckpt / "position.json")
        refuse_other_world_size(meta.get("world_size", len(meta["rng_states"])), rt)
        for runner in (g, f):
            runner.engine.load_checkpoint(str(ckpt / runner.name), tag="last")
        rng.set_state(torch.tensor(meta["rng_states"][rt.rank], dtype=torch.uint8))
        if (ckpt / "rank_buffers.json").is_file():
            restore_rank_buffers(f.module, load_state(ckpt / "rank_buffers")[0], rt.rank)
        return deepspeed_position(meta)
    if not (ckpt / "last.json").is_file():
        return None
    tensors, meta = load_state(ckpt / "last")
    refuse_other_world_size(meta["world_size"], rt)
    for name, runner in (("g", g), ("f", f)):
        prefix = f"{name}.model."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_state_strict(runner.module, state, f"checkpoint {name}")
        runner.base_optimizer.load_state_dict(unflatten_state(meta["optim"][f"{name}_optim"], tensors))
    restore_rng(tensors, meta["rng"])
    rng.set_state(tensors["distortion_rng"][rt.rank].clone())
    restore_rank_buffers(f.module, tensors, rt.rank)
    return meta["position"]


def deepspeed_position(meta: dict[str, Any]) -> Position:
    """The position in a DeepSpeed run's position.json (which also holds the world size and the RNG states)."""
    return {k: v for k, v in meta.items() if k not in ("rng_states", "world_size")}


@torch.no_grad()
def restore_rank_buffers(module: nn.Module, tensors: dict[str, torch.Tensor], rank: int) -> None:
    """Put this rank's own BatchNorm statistics (``f.rank<r>.<name>``, multi-process runs only) back into f."""
    for name, buf in module.named_buffers():
        own = tensors.get(f"f.rank{rank}.{name}")
        if own is not None:
            buf.copy_(own)


def refuse_other_world_size(written_by: int, rt: Runtime) -> None:
    if written_by != rt.world_size:
        raise ConfigError(
            f"checkpoint was written by {written_by} processes, this run has {rt.world_size}: "
            "an exact resume needs the same world size (or start fresh with resume=false)"
        )
