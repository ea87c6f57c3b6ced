"""`segue evaluate`'s configurations: a victim's training recipe, a victim run, a baseline, a sweep.

Every dataclass validates in ``__post_init__`` (a bad value is a one-line ``ValueError`` naming the field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from segue_dist.attacks import AttackerConfig

# method name -> (library baseline, its keyword options)
BASELINE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ue": ("ue", {"mode": "samplewise"}),
    "ue-classwise": ("ue", {"mode": "classwise"}),
    "lsp": ("lsp", {}),
    "lsp-classwise": ("lsp", {"samplewise": False}),
    "random": ("random", {}),
    "random-classwise": ("random", {"classwise": True}),
    "tap": ("tap", {}),  # targeted adversarial poisoning (Fowl et al. 2021), baselines/tap.py
}


# Victims that train nothing: a pretrained recogniser enrols the training set (segue_dist.evaluate.enrolment).
ENROLMENT_VICTIMS = ("dlib_enrolment",)
ENROLMENT_GROUP = "enrolment"  # their rows' tags.group: a report table of their own, beside the robustness tables


# ------------------------------------------------------------------------------------------------------------ configs


@dataclass
class VictimConfig:
    """How a victim is trained.

    Adam (1e-3) is the default because short CPU runs learn with it and barely with SGD (figures:
    docs/measurements.md); for long GPU runs the paper-style recipe is ``optimizer=sgd lr=0.1`` (cosine, weight decay
    5e-4).
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 0.0  # 0 = the optimizer's default: SGD 0.1, Adam 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 0 (per step)
    size: int = 0  # load images at size x size (short side resized, centre-cropped, as shards build); 0 = as stored
    small_stem: bool | None = None  # None = the classifier factory's choice (small-image stem at <= 112 px)
    seed: int = 0
    mode: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = 4.0  # auto mode streams training sets larger than this as uint8
    workers: int = 2
    eval_every: int = 1  # clean-test accuracy every n epochs (and always after the last)
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1 (got {self.lr}, {self.weight_decay}, {self.momentum})"
            )
        if self.warmup_epochs < 0 or self.workers < 0:
            raise ValueError("warmup_epochs and workers must be >= 0")
        if self.size and self.size < 8:
            raise ValueError(f"size must be 0 (as stored) or >= 8, got {self.size}")
        if self.memory_limit_gb <= 0:
            raise ValueError(f"memory_limit_gb must be > 0, got {self.memory_limit_gb}")

    @property
    def learning_rate(self) -> float:
        return self.lr or (0.1 if self.optimizer == "sgd" else 1e-3)


@dataclass
class VictimRunConfig:
    """`segue evaluate victim`: one victim on one training set (plus, optionally, the clean control)."""

    train_dir: str = ""  # the (protected) training split
    test_dir: str = ""  # clean test split
    clean_train: str = ""  # clean training split: partial protection, and the control with control=true
    control: bool = False  # also train the same victim on clean_train
    arch: str = "resnet18"
    dataset: str = ""  # names in the result (report tables)
    method: str = "protected"
    out: str = "runs/eval/victim"
    device: str = ""  # "" = CUDA when present, else CPU
    train: VictimConfig = field(default_factory=VictimConfig)
    attack: AttackerConfig = field(default_factory=AttackerConfig)


@dataclass
class BaselineConfig:
    """`segue evaluate baseline`: write a baseline-protected copy of a training split."""

    method: str = "lsp"
    in_dir: str = ""
    out_dir: str = ""
    eps: float = 8 / 255
    seed: int = 0
    size: int = 0  # 0 = as stored; the protected set is written at this size
    surrogate: str = "resnet18"  # UE's surrogate model
    surrogate_small_stem: bool | None = None
    device: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword options of the library baseline

    def __post_init__(self) -> None:
        if self.method not in BASELINE_METHODS:
            raise ValueError(f"method must be one of {', '.join(BASELINE_METHODS)}, got {self.method!r}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (e.g. 8/255), got {self.eps}")


@dataclass
class MethodSpec:
    """One training set of a sweep: the clean control, a protect output, or a baseline generated on demand."""

    name: str = ""
    train: str = ""  # protected training split; "" = data.clean_train (name "clean") or <out>/baselines/<name>/train
    baseline: str = ""  # one of BASELINE_METHODS: generate `train` with it when missing
    eps: float = 8 / 255
    options: dict[str, Any] = field(default_factory=dict)  # baseline keyword options (e.g. ue max_rounds)
    source: str = ""  # free text for the report, e.g. "generator trained on lfw62"
    time_s: float = 0.0  # generation wall time when measured elsewhere (Table VII); baselines record their own

    def __post_init__(self) -> None:
        if not self.name or "__" in self.name or "/" in self.name:
            raise ValueError(f"method name must be non-empty without '__' or '/', got {self.name!r}")
        if self.baseline and self.baseline not in BASELINE_METHODS:
            raise ValueError(f"methods.{self.name}.baseline must be one of {', '.join(BASELINE_METHODS)}")
        if self.name != "clean" and not self.train and not self.baseline:
            raise ValueError(f"method {self.name!r} needs `train` (a protected split) or `baseline`")


@dataclass
class DataSpec:
    dataset: str = ""  # the name used in report tables (lfw62, glint24, ...)
    clean_train: str = ""
    test: str = ""

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("data.dataset (a name for the report) is required")


@dataclass
class SweepConfig:
    """A table's worth of victims: every method x victim x attack row. An enrolment victim (``dlib_enrolment``)
    trains nothing, so it gets one row per method (attack ``none``) whatever ``attacks`` lists."""

    name: str = ""
    out: str = ""  # default runs/eval/<name>
    seed: int = 0
    device: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    methods: list[MethodSpec] = field(default_factory=list)
    victims: list[str] = field(default_factory=lambda: ["resnet18"])
    attacks: list[AttackerConfig] = field(default_factory=lambda: [AttackerConfig()])
    train: VictimConfig = field(default_factory=VictimConfig)
    quality: bool = True  # image quality of every protected set against the clean training set
    lpips_weights: str = ""  # local AlexNet ImageNet weights; empty = LPIPS skipped
    lpips_lin: str = ""  # local LPIPS v0.1 lin weights (alex.pth); empty = uncalibrated LPIPS
    surrogate: str = "resnet18"  # UE baselines' surrogate

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name is required")
        if not self.methods:
            raise ValueError("methods must list at least one training set (e.g. - name: clean)")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        attacks = [a.name for a in self.attacks]
        if not attacks or len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks need unique names, got {attacks}")
        if not self.victims or len(set(self.victims)) != len(self.victims):
            raise ValueError(f"victims must be a non-empty list without repeats, got {self.victims}")
        from segue_dist.models.classifiers import ARCHITECTURES

        allowed = [*ARCHITECTURES, *ENROLMENT_VICTIMS]
        unknown = [v for v in self.victims if v not in allowed]
        if unknown:
            raise ValueError(f"unknown victim {unknown[0]!r}; allowed: {', '.join(allowed)}")
        if not self.out:
            self.out = f"runs/eval/{self.name}"
