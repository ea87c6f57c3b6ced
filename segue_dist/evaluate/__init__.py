"""`segue evaluate`: the attacker's side. Train victims on protected data and test them on clean data.

The paper's metric (Section IV-A) is the **clean-test accuracy** of a victim trained from scratch on the protected
training set: the lower, the better the protection, with 100/K (chance) the floor. Every result here carries chance and
the ratio to chance beside the accuracy, and the same victim trained on the clean set is the control.

Actions::

    segue evaluate victim   --train P --test T [--clean-train C --control] [--arch resnet18] [train.epochs=8 ...]
    segue evaluate baseline --method ue|ue-classwise|lsp|lsp-classwise|random|random-classwise --in C --out P
    segue evaluate quality  --clean C --protected P [--lpips-weights alexnet.pth [--lpips-lin alex.pth]]
    segue evaluate sweep    --config configs/experiments/x.yaml [key=value ...]

Victims load the training set into memory as uint8 (small evaluation sets: LFW-62 at 64 px is ~35 MB) or, above
``train.memory_limit_gb``, stream it with the WebDataset ``TrainStream``. The attacker's transforms live in
``segue_dist.attacks``; a sweep runs every (method x victim x attack) row, writes one JSON per row, and resumes by
skipping rows whose JSON exists with the same settings. The victim ``dlib_enrolment`` trains nothing: it enrols the
training set with dlib's pretrained face descriptor (the ``[faces]`` extra) and identifies the clean test set by
nearest neighbour, class mean and a linear probe (one row per method, group ``enrolment``).

Modules: :mod:`.config` (dataclasses), :mod:`.data` (in-memory sets, feeds), :mod:`.victim` (the training loop),
:mod:`.quality` (image quality by key), :mod:`.enrolment` (the pretrained-recogniser row), :mod:`.baseline` (UE / LSP / random copies), :mod:`.sweep`, :mod:`.cli`.
Everything public is re-exported here.
"""

from __future__ import annotations

from segue_dist.evaluate.baseline import BASELINE_STATS, baseline_is_complete, verify_written, write_baseline
from segue_dist.evaluate.cli import add_arguments, main, run
from segue_dist.evaluate.config import (
    BASELINE_METHODS,
    ENROLMENT_GROUP,
    ENROLMENT_VICTIMS,
    BaselineConfig,
    DataSpec,
    MethodSpec,
    SweepConfig,
    VictimConfig,
    VictimRunConfig,
)
from segue_dist.evaluate.data import (
    ImageSet,
    MemoryFeed,
    PreparedData,
    StreamFeed,
    TestFeed,
    TrainFeed,
    load_image_set,
    mix_partial,
    prepare_data,
)
from segue_dist.evaluate.enrolment import EmbeddingCache, embed_split, run_enrolment
from segue_dist.evaluate.quality import image_quality_between, iter_pairs, load_lpips, run_quality
from segue_dist.evaluate.sweep import Row, method_train_dir, plan_rows, print_results_table, run_sweep
from segue_dist.evaluate.victim import build_optimizer, row_name, run_victim, test_accuracy, train_victim

__all__ = [
    "BASELINE_METHODS",
    "BASELINE_STATS",
    "BaselineConfig",
    "ENROLMENT_GROUP",
    "ENROLMENT_VICTIMS",
    "EmbeddingCache",
    "DataSpec",
    "ImageSet",
    "MemoryFeed",
    "MethodSpec",
    "PreparedData",
    "Row",
    "StreamFeed",
    "SweepConfig",
    "TestFeed",
    "TrainFeed",
    "VictimConfig",
    "VictimRunConfig",
    "add_arguments",
    "baseline_is_complete",
    "build_optimizer",
    "embed_split",
    "image_quality_between",
    "iter_pairs",
    "load_image_set",
    "load_lpips",
    "main",
    "method_train_dir",
    "mix_partial",
    "plan_rows",
    "prepare_data",
    "print_results_table",
    "row_name",
    "run",
    "run_enrolment",
    "run_quality",
    "run_sweep",
    "run_victim",
    "test_accuracy",
    "train_victim",
    "verify_written",
    "write_baseline",
]
