"""One epoch of supervised training with cross-entropy: the loop shared by `segue cluster fit-extractor` (a face
embedder behind a CosFace head) and `segue evaluate` (victims trained from scratch, paper section IV-A).

The callers differ in what they feed (a WebDataset stream with flips vs an in-memory feed with the attacker's
transforms and adversarial training) and in how logits are made (a margin head needs the labels); they pass those
in. Library code: tensors in, numbers out, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class EpochStats:
    """Sums over one epoch; ``seen`` counts samples."""

    loss_sum: float = 0.0  # Σ batch-mean CE × batch size
    correct: int = 0  # argmax(logits) == label (the argmax of soft targets)
    seen: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.seen)

    @property
    def accuracy(self) -> float:
        """Training accuracy as a fraction in [0, 1]."""
        return self.correct / max(1, self.seen)


def supervised_epoch(
    batches: Iterable[tuple[Tensor, Tensor]],
    logits_of: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    on_step: Callable[[float], None] | None = None,
) -> EpochStats:
    """Train on every (x, targets) of ``batches``: CE(logits_of(x, targets), targets), one optimiser and scheduler
    step per batch.

    x: (B, ...) on the model's device; targets: (B,) int64 class indices or (B, K) soft targets (Mixup / CutMix).
    The caller sets train mode and makes the batches lazily, so a transform that runs the model (PGD) sees the
    weights after the previous step. ``on_step`` gets each batch's loss (progress bars).
    """
    stats = EpochStats()
    for x, targets in batches:
        logits = logits_of(x, targets)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        hard = targets if targets.ndim == 1 else targets.argmax(1)
        stats.loss_sum += loss.item() * x.shape[0]
        stats.correct += int((logits.argmax(1) == hard).sum())
        stats.seen += x.shape[0]
        if on_step is not None:
            on_step(loss.item())
    return stats
