"""Training configuration: `TrainConfig` and its parts, loaded from configs/train/*.yaml plus `key=value` overrides.

Defaults follow the paper (section IV-A, Implementation Details) where it gives one; `schedule` and `f_reset_every`
are this implementation's additions (see segue_dist/train.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from segue_dist.distortion import DistortionConfig
from segue_dist.models.generator import GeneratorConfig

SCHEDULES = ("alternate", "joint")  # see TrainConfig.schedule
F_RESET_PARTS = ("all", "gray")  # see TrainConfig.f_reset_part


@dataclass
class DataConfig:
    train: str = ""  # a split folder of shards, e.g. shards/lfw62/train
    labels: str = ""  # pseudo-label sidecar (key -> label); empty = true labels from .cls
    image_size: list[int] = field(default_factory=lambda: [64])  # [side] or [height, width]
    batch_size: int = 64  # per process
    samples_per_epoch: int = 0  # 0 = the size of the training set
    num_workers: int = 2
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        if len(self.image_size) not in (1, 2) or min(self.image_size) < 16:
            raise ValueError(f"data.image_size must be [side] or [height, width] >= 16, got {self.image_size}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")

    @property
    def size(self) -> tuple[int, int]:
        return (self.image_size[0], self.image_size[-1])


@dataclass
class SurrogateConfig:
    arch: str = "resnet18"
    pretrained: str = ""  # local weights file only; never downloaded
    small_stem: bool | None = None  # None = automatic (on for images <= 112 px)
    # A second network of the same arch that sees only the BT.601 luminance of f's input; f's loss and G's CE term
    # are the mean of the two networks' (segue_dist/models/surrogate.py): G must also protect under grayscale.
    grayscale_twin: bool = False


@dataclass
class OptimConfig:
    lr_g: float = 5e-4
    lr_f: float = 5e-4
    weight_decay_f: float = 0.0
    schedule: str = "constant"  # constant | cosine | step (per epoch)
    alpha: float = 1.0  # weight of CE(f(distort(x + δ)), ŷ) in G's loss
    beta: float = 1e-3  # weight of E‖δ‖₂
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"optim.schedule must be constant, cosine or step, got {self.schedule!r}")


@dataclass
class CurriculumConfig:
    """A second stage of training: from epoch ``from_epoch`` on, the ``distortion`` keys given here replace the run's.

    E.g. ``curriculum.from_epoch=13 curriculum.distortion.grayscale_p=0.5``: G first finds the pattern a network
    learns first, then learns to keep it through grayscale (docs/protection_research.md). 0 = one stage.
    """

    from_epoch: int = 0
    distortion: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.from_epoch < 0 or (self.from_epoch == 1):
            raise ValueError(f"curriculum.from_epoch must be 0 (off) or >= 2, got {self.from_epoch}")
        known = {f.name for f in fields(DistortionConfig)}
        unknown = sorted(set(self.distortion) - known)
        if unknown:
            raise ValueError(f"curriculum.distortion: unknown distortion key(s) {', '.join(unknown)}")
        if self.distortion and not self.from_epoch:
            raise ValueError("curriculum.distortion is set but curriculum.from_epoch is 0: say when the stage begins")


@dataclass
class TrainConfig:
    out: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    distortion: DistortionConfig = field(default_factory=DistortionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    epochs: int = 20
    # alternate: Algorithm 1 as printed (an f epoch, then f_every - 1 G epochs against the frozen f).
    # joint: every step updates f and G together on one loss through the distortion layer (see joint_step).
    schedule: str = "alternate"
    f_every: int = 5  # alternate: epoch % f_every == 1 trains f; the other epochs train G (Algorithm 1)
    # joint: re-initialise f (fresh weights, fresh optimiser state) every this many epochs, 0 = never. A fresh f
    # learns what is easiest first, so G keeps being pushed toward what a victim trained from scratch picks up first.
    f_reset_every: int = 0
    # Which part of f each reset renews: all of it, or only a grayscale twin's luminance network, so the colour
    # network keeps the shortcut it has learned (a screen; it did not help: docs/protection_research.md, section 10).
    f_reset_part: str = "all"
    # Stop once f's loss on the unlearnable examples, averaged over an epoch in which f trains and across ranks,
    # is below this (paper, section III-D: "when the loss of f on the unlearnable examples drops below 0.001").
    stop_loss: float = 1e-3
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0 = at epoch ends only)
    resume: bool = True
    deepspeed: str = ""  # DeepSpeed JSON: train G and f as two DeepSpeed engines
    log_every: int = 10
    tensorboard: bool = True
    max_epochs_this_run: int = 0  # stop (resumably) after this many epochs; for tests and time-boxed jobs

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.f_every < 2:
            raise ValueError(f"f_every must be >= 2 (one f epoch then G epochs), got {self.f_every}")
        if self.f_reset_every < 0:
            raise ValueError(f"f_reset_every must be >= 0, got {self.f_reset_every}")
        if self.f_reset_part not in F_RESET_PARTS:
            raise ValueError(f"f_reset_part must be one of {', '.join(F_RESET_PARTS)}, got {self.f_reset_part!r}")
        if self.f_reset_part == "gray" and not self.surrogate.grayscale_twin:
            raise ValueError("f_reset_part=gray needs surrogate.grayscale_twin=true (there is no grayscale network)")
        if self.curriculum.from_epoch > self.epochs:
            raise ValueError(
                f"curriculum.from_epoch {self.curriculum.from_epoch} is after the last epoch {self.epochs}"
            )
        replace(self.distortion, **self.curriculum.distortion)  # the second stage's distortion must be valid too
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def distortion_at(cfg: TrainConfig, epoch: int) -> DistortionConfig:
    """The distortion layer's settings for ``epoch`` (from 1): the run's, with the curriculum's keys from its stage on."""
    stage = cfg.curriculum
    if stage.from_epoch and epoch >= stage.from_epoch:
        return replace(cfg.distortion, **stage.distortion)
    return cfg.distortion
