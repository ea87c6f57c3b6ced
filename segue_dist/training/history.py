"""What a training run records: per-step losses, the per-epoch history record, metrics.jsonl and TensorBoard.

History record of one epoch (`train_summary.json` "history", one per epoch; means over the epoch's steps and across
ranks; a quantity the epoch's stage does not compute is null):

| key | f epoch | G epoch | joint epoch |
|---|---|---|---|
| `loss` | f's CE | G's objective | the joint objective (= G's) |
| `f_ce_on_unlearnable` | f's training loss CE(f(x + δ), ŷ) | null (f is frozen) | f's training loss CE(f(T(x + δ)), ŷ) |
| `g_objective` | null | α·CE(f(T(x + δ)), ŷ) + β·E‖δ‖₂ | same |
| `g_ce` | null | the CE term of `g_objective` (frozen f) | same (f training) |
| `delta_l2` | null | E‖δ‖₂ | same |

`stop_loss` tests `f_ce_on_unlearnable` (paper, section III-D). Before this layout, `f_ce_on_unlearnable` held the CE of
the step, whatever the stage (in G epochs the frozen f's CE on distorted inputs) and `delta_l2` was 0 in f epochs;
train_summary.json files written then (bench/results/) keep the old meaning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segue_dist.training.config import TrainConfig
from segue_dist.training.runtime import Runtime

# Which loss fields each stage computes; the others are null in its record.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "f": ("f_ce_on_unlearnable",),
    "g": ("g_objective", "g_ce", "delta_l2"),
    "joint": ("f_ce_on_unlearnable", "g_objective", "g_ce", "delta_l2"),
}
LOSS_FIELDS = ("f_ce_on_unlearnable", "g_objective", "g_ce", "delta_l2")


@dataclass
class StepLosses:
    """One step's losses (Python floats): ``loss`` is what the step minimised, the rest as in the module table."""

    loss: float
    f_ce_on_unlearnable: float | None = None
    g_objective: float | None = None
    g_ce: float | None = None
    delta_l2: float | None = None

    def logged(self, stage: str) -> dict[str, float]:
        """metrics.jsonl / TensorBoard scalars of this step, named ``<stage>/<field>``."""
        values = {"loss": self.loss, **{k: getattr(self, k) for k in STAGE_FIELDS[stage]}}
        return {f"{stage}/{k}": v for k, v in values.items()}


class EpochMeter:
    """Sums one epoch's step losses on this rank; `record` turns them into the history record (collective)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.fields = ("loss", *STAGE_FIELDS[stage])
        self.sums = dict.fromkeys(self.fields, 0.0)
        self.skipped = 0.0
        self.steps = 0

    def add(self, losses: StepLosses, skipped: int) -> None:
        for key in self.fields:
            self.sums[key] += getattr(losses, key)
        self.skipped += float(skipped)
        self.steps += 1

    def record(self, epoch: int, rt: Runtime, batch_size: int, seconds: float) -> dict[str, Any]:
        """The epoch's history record. Every rank must call it: the means are all-reduced across ranks.

        Ranks see the same number of batches, so each rank's mean is over the same count and the mean of means is
        the epoch mean. ``skipped_samples`` is the total over ranks of undecodable samples the loader dropped.
        """
        n = max(self.steps, 1)
        *means, mean_skipped = rt.mean_across_ranks([*(self.sums[k] / n for k in self.fields), self.skipped])
        measured = dict(zip(self.fields, means, strict=True))
        return {
            "epoch": epoch,
            "stage": self.stage,
            "loss": measured["loss"],
            **{key: measured.get(key) for key in LOSS_FIELDS},
            "skipped_samples": mean_skipped * rt.world_size,
            "samples_per_s": self.steps * batch_size * rt.world_size / max(seconds, 1e-9),
        }


class Logger:
    """Rank 0 writes metrics.jsonl and TensorBoard; other ranks are silent."""

    def __init__(self, cfg: TrainConfig, rt: Runtime):
        self.enabled = rt.is_main
        self.path = Path(cfg.out) / "metrics.jsonl"
        self.tb = None
        if self.enabled and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.out) / "tb"))
            except ImportError:
                self.tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append ``values`` at ``step``; non-numbers (null fields, the stage name) go to the JSON line only."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        self.log(step, {f"epoch/{k}": v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
