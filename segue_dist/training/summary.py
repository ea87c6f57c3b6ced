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
from segue_dist.training.run_state import RunState, StopReason
from segue_dist.training.runtime import Runner, Runtime
from segue_dist.utils.io import atomic_write_json
from segue_dist.utils.progress import console, print_table
from segue_dist.weights import export_generator, label_map_hash


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
    run: RunState,
    side_info: SideInformation,
) -> dict[str, Any]:
    """The end of `train`: check the ranks agree, then rank 0 exports the generator (unless the run paused), writes
    train_summary.json and prints the per-epoch table; returns the summary. Collective: no rank returns before
    rank 0 has written."""
    summary: dict[str, Any] = {
        "stop_reason": run.stop_text(),
        "last_epoch": run.epochs_done,
        "steps": run.step,
        "world_size": rt.world_size,
        "deepspeed": rt.deepspeed,
        "history": history,
        "ranks_in_sync": ranks_in_sync(g, rt),
    }
    if rt.is_main:
        export_and_report(g, cfg, summary, run, side_info)
    if rt.world_size > 1:
        dist.barrier()
    return summary


def export_and_report(
    g: Runner, cfg: TrainConfig, summary: dict[str, Any], run: RunState, side_info: SideInformation
) -> None:
    """Rank 0's part of `finish`: export G (unless paused; adds ``generator`` to ``summary``), write
    train_summary.json last, print the table and the stop."""
    exported = run.stop is not StopReason.PAUSED
    if exported:
        pseudo = side_info.pseudo_labels
        weights = export_generator(
            g.module,
            cfg.out,
            label_map=side_info.identity_labels,
            label_source=side_info.source,
            train_config=to_dict(cfg),
            extra={"pseudo_labels_sha256": label_map_hash(pseudo) if pseudo else "", "epochs_run": run.epochs_done},
        )
        summary["generator"] = str(weights)
    atomic_write_json(Path(cfg.out) / "train_summary.json", summary)
    if summary["history"]:  # empty when a finished checkpoint was only exported
        print_history(summary["history"])
    console.print(f"stopped: {run.stop_text()}" + (f"; generator: {summary['generator']}" if exported else ""))


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
