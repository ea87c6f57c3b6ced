"""Where a training run stands and why it ends: the bookkeeping around Algorithm 1's epoch loop, in one type.

A run is at ``epoch`` (the next one to train, from 1), ``resume_batches`` into it (a resumed run fast-forwards the
loader past them), after ``step`` optimiser steps. It ends after an epoch for one of three reasons (`StopReason`):
all the epochs asked for ran, f's loss on the unlearnable examples fell below ``stop_loss`` (paper, section III-D),
or this process has trained ``max_epochs_this_run`` epochs and the run will be resumed (paused: nothing is exported).

The checkpoint of the epoch a run ended with for good records why in its position's ``stop`` entry, so that starting
the run again does nothing (`RunState.finished`) unless more epochs, or a stop_loss below the loss it stopped at,
are asked for. A checkpoint's position (JSON): ``{"epoch": the next epoch, "batch": batches of it done, "step": steps
done}`` and, on that last checkpoint, ``"stop": {"reason": "epochs" | "stop_loss", "epochs": the epochs asked for``,
and for stop_loss ``"f_loss": the loss it stopped at, "stop_loss": the threshold then}``. A checkpoint written before
runs recorded their stop has none: at an epoch end it reads as stopped on its epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from segue_dist.training.config import TrainConfig
from segue_dist.training.resume import Position, saved_position
from segue_dist.utils.io import read_json


class StopReason(Enum):
    """Why a run stopped. ``value`` is the checkpoint's ``stop.reason`` (a pause is never recorded there)."""

    EPOCHS = "epochs"  # all of ``epochs`` ran
    STOP_LOSS = "stop_loss"  # f's loss on the unlearnable examples fell below ``stop_loss``
    PAUSED = "paused"  # ``max_epochs_this_run`` reached: resumed later, nothing exported


# How train_summary.json and the console word a pause (the other reasons' words are `RunState.stop_text`).
PAUSED_TEXT = "paused (max_epochs_this_run)"


def stop_after(record: dict[str, Any], cfg: TrainConfig, epoch: int, epochs_this_run: int) -> StopReason | None:
    """Why the run stops after ``epoch`` (its history ``record``, the ``epochs_this_run``-th epoch this process
    trained), or None. The loss test is the paper's (section III-D): f's loss on the unlearnable examples, so only an
    epoch in which f trained can meet it."""
    f_loss = record["f_ce_on_unlearnable"]
    if f_loss is not None and f_loss < cfg.stop_loss:
        return StopReason.STOP_LOSS
    if epoch >= cfg.epochs:
        return StopReason.EPOCHS
    if cfg.max_epochs_this_run and epochs_this_run >= cfg.max_epochs_this_run:
        return StopReason.PAUSED
    return None


def summary_stop(summary: dict[str, Any]) -> StopReason:
    """The stop reason a train_summary.json records (it words it: `RunState.stop_text`)."""
    text = summary.get("stop_reason", "")
    if text == PAUSED_TEXT:
        return StopReason.PAUSED
    return StopReason.EPOCHS if text == StopReason.EPOCHS.value else StopReason.STOP_LOSS


@dataclass
class RunState:
    """A run's position and stop; `train` reads it, the epoch loop advances it, and checkpoints write it."""

    epoch: int = 1  # the next epoch to train (from 1)
    resume_batches: int = 0  # batches of ``epoch`` already trained: the loader fast-forwards past them
    step: int = 0  # optimiser steps so far
    epochs_this_run: int = 0  # epochs this process trained
    stop: StopReason | None = None
    epochs_asked: int = 0  # ``epochs`` when it stopped
    f_loss: float | None = None  # STOP_LOSS: f's loss it stopped at
    stop_loss: float | None = None  # STOP_LOSS: the threshold then

    @classmethod
    def saved(cls, cfg: TrainConfig) -> RunState:
        """Where ``cfg.out``'s last checkpoint left the run (a fresh run when there is none or ``cfg.resume`` is
        off), with its stop if that still holds for ``cfg`` (`finished`). Reads JSON only: no model is built and no
        process group joined."""
        position = saved_position(cfg) if cfg.resume else None
        if position is None:
            return cls()
        run = cls(epoch=position["epoch"], resume_batches=position["batch"], step=position["step"])
        if not run.resume_batches:
            run.restore_stop(position.get("stop") or {"reason": "epochs", "epochs": run.epochs_done}, cfg)
        return run

    def restore_stop(self, stop: dict[str, Any], cfg: TrainConfig) -> None:
        """Take a checkpoint's ``stop`` entry, unless ``cfg`` asks for more (then the run continues)."""
        self.stop, self.epochs_asked = StopReason(stop["reason"]), stop["epochs"]
        self.f_loss, self.stop_loss = stop.get("f_loss"), stop.get("stop_loss")
        if not self.rerun_hints(cfg):
            self.stop = None

    @property
    def epochs_done(self) -> int:
        return self.epoch - 1

    @property
    def finished(self) -> bool:
        """The run ended for good (all its epochs, or the loss test): nothing is left to train for this config."""
        return self.stop in (StopReason.EPOCHS, StopReason.STOP_LOSS)

    def exported(self, cfg: TrainConfig) -> bool:
        """Whether ``cfg.out`` holds the generator of this run's end and, written last, the summary of that end."""
        summary_path = Path(cfg.out) / "train_summary.json"
        if not summary_path.is_file() or not (Path(cfg.out) / "generator.json").is_file():
            return False
        summary = read_json(summary_path)
        return summary.get("last_epoch") == self.epochs_done and summary_stop(summary) is not StopReason.PAUSED

    def epochs_left(self, cfg: TrainConfig) -> int:
        """Epochs still to train: none once stopped (a finished run found under ``out`` is only exported)."""
        return 0 if self.stop else max(0, cfg.epochs - self.epoch + 1)

    def end_epoch(self, record: dict[str, Any], cfg: TrainConfig) -> None:
        """Move past the epoch just trained (its history ``record``) and apply the stop rule (`stop_after`)."""
        self.epochs_this_run += 1
        self.stop = stop_after(record, cfg, self.epoch, self.epochs_this_run)
        self.epochs_asked = cfg.epochs
        if self.stop is StopReason.STOP_LOSS:
            self.f_loss, self.stop_loss = record["f_ce_on_unlearnable"], cfg.stop_loss
        self.epoch += 1
        self.resume_batches = 0

    def position(self, batch: int = 0) -> Position:
        """The checkpoint position ``batch`` batches into ``epoch``; at an epoch end of a finished run, with why."""
        position: Position = {"epoch": self.epoch, "batch": batch, "step": self.step}
        if self.finished and self.stop is not None:
            position["stop"] = {"reason": self.stop.value, "epochs": self.epochs_asked}
            if self.stop is StopReason.STOP_LOSS:
                position["stop"].update(f_loss=self.f_loss, stop_loss=self.stop_loss)
        return position

    def stop_text(self) -> str:
        """Why the run stopped, as train_summary.json and the console word it ("epochs" when nothing stopped it)."""
        if self.stop is StopReason.STOP_LOSS:
            return f"f's loss on unlearnable examples {self.f_loss:.2e} < {self.stop_loss:g}"
        return PAUSED_TEXT if self.stop is StopReason.PAUSED else StopReason.EPOCHS.value

    def rerun_hints(self, cfg: TrainConfig) -> list[str]:
        """What would make ``cfg`` continue this stopped run; empty when it continues as it is."""
        hints = []
        if self.epochs_done >= cfg.epochs:
            hints.append(f"raise epochs=N (N > {self.epochs_done})")
        if self.stop is StopReason.STOP_LOSS and self.f_loss is not None and self.f_loss < cfg.stop_loss:
            hints.append(f"lower stop_loss below {self.f_loss:.2e} (stop_loss=0 never stops early)")
        return hints

    def finished_state(self) -> str:
        return f"finished ({self.epochs_done}/{self.epochs_asked} epochs, stopped: {self.stop_text()})"

    def finished_line(self, cfg: TrainConfig) -> str:
        """The one line a rerun of a finished run prints."""
        hints = " and ".join(self.rerun_hints(cfg))
        return f"{cfg.out} is {self.finished_state()}; nothing to do — {hints} to train further, or choose a new out="

    def export_note(self, cfg: TrainConfig) -> str:
        """What a finished run whose export is missing prints before it exports."""
        return f"{cfg.out}: {self.finished_state()}, but its generator is not exported: exporting it"
