"""The end of a training run: check the ranks agree, export G (rank 0), write train_summary.json, print the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segue_dist.config import to_dict
from segue_dist.training.build import SideInformation
from segue_dist.training.config import TrainConfig
from segue_dist.training.runtime import Runner, Runtime
from segue_dist.utils.io import atomic_write_json
from segue_dist.utils.progress import console, print_table
from segue_dist.weights import export_generator, label_map_hash

PAUSED = "paused (max_epochs_this_run)"  # the stop reason of a run that will be resumed: nothing is exported


def parameter_checksum(module: nn.Module) -> torch.Tensor:
    """(P,) float64: the sum of each parameter tensor, a cheap fingerprint of the weights."""
    return torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()


def ranks_in_sync(g: Runner, rt: Runtime) -> bool:
    """All ranks hold bit-identical generator weights (DDP/ZeRO should guarantee it; we check, cheaply). Collective."""
    local = parameter_checksum(g.module)
    if rt.world_size == 1:
        return True
    gathered = [torch.empty_like(local.to(rt.comm_device)) for _ in range(rt.world_size)]
    dist.all_gather(gathered, local.to(rt.comm_device))
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def finish(
    g: Runner,
    cfg: TrainConfig,
    rt: Runtime,
    history: list[dict[str, Any]],
    stop_reason: str,
    epoch: int,
    step: int,
    labels: SideInformation,
) -> dict[str, Any]:
    """Export the generator (rank 0, unless paused), print the per-epoch table, and return the summary."""
    summary: dict[str, Any] = {
        "stop_reason": stop_reason,
        "last_epoch": epoch,
        "steps": step,
        "world_size": rt.world_size,
        "deepspeed": rt.deepspeed,
        "history": history,
        "ranks_in_sync": ranks_in_sync(g, rt),
    }
    if not rt.is_main:
        return summary
    exported = stop_reason != PAUSED
    if exported:
        pseudo = labels.pseudo_labels
        weights = export_generator(
            g.module,
            cfg.out,
            label_map=labels.identity_labels,
            label_source=labels.source,
            train_config=to_dict(cfg),
            extra={"pseudo_labels_sha256": label_map_hash(pseudo) if pseudo else "", "epochs_run": epoch},
        )
        summary["generator"] = str(weights)
    atomic_write_json(Path(cfg.out) / "train_summary.json", summary)
    if history:  # empty when a finished checkpoint was only exported
        print_history(history)
    console.print(f"stopped: {stop_reason}" + (f"; generator: {summary['generator']}" if exported else ""))
    return summary


def print_history(history: list[dict[str, Any]]) -> None:
    """One row per epoch; "–" where the epoch's stage does not compute the quantity."""

    def cell(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    rows = [
        [
            str(r["epoch"]),
            r["stage"],
            cell(r["loss"], ".4f"),
            cell(r["f_ce_on_unlearnable"], ".4f"),
            cell(r["g_objective"], ".4f"),
            cell(r["delta_l2"], ".3f"),
            cell(r["samples_per_s"], ".0f"),
        ]
        for r in history
    ]
    print_table("segue train", ["epoch", "stage", "loss", "f CE on UE", "G objective", "‖δ‖₂", "samples/s"], rows)
