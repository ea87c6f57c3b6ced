"""The tiny `segue train` recipe shared by the whole-run tests (test_train_runs.py, test_train_rerun.py): a synthetic
shard set of 4 identities and an in-process, one-process run of a few seconds an epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segue_dist.config import load_config
from segue_dist.train import TrainConfig, train

IDENTITIES = 4
# 48 training samples in batches of 8: 6 steps per epoch, a checkpoint every 2 steps (mid-epoch at steps 2, 4, 8, 10).
TINY = [
    "data.image_size=[32]",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "generator.width=8",
    "generator.num_res_blocks=1",
    "surrogate.small_stem=false",
    "schedule=joint",  # both players step on every batch: a resume must restore both, and the distortion RNG
    "epochs=2",
    "checkpoint_every=2",
    "tensorboard=false",
]


def build_tiny_shards(root: Path) -> Path:
    """4 synthetic identities x 14 faces at 32 px under ``root`` (12 training and 2 test faces each); returns the
    training split. The test modules' ``tiny_shards`` fixture."""
    from segue_dist.data.synthetic import generate_corpus
    from segue_dist.shards import ShardsConfig, build_shards

    for name, index, image in generate_corpus(identities=IDENTITIES, per_identity=14, size=32):
        folder = root / "src" / name
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:02d}.png")
    config = ShardsConfig(src=str(root / "src"), out=str(root / "shards"), test_per_identity=2, size=[32], workers=1)
    build_shards(config, show_progress=False)
    return root / "shards" / "train"


def tiny_overrides(out: Path, shards: Path, *extra: str) -> list[str]:
    """The `key=value` arguments of a tiny run into ``out`` (later ones win)."""
    return [f"out={out}", f"data.train={shards}", *TINY, *extra]


def run_train(out: Path, shards: Path, *extra: str) -> dict[str, Any]:
    """One in-process `segue train` (one CPU process) with the tiny recipe; returns the summary."""
    return train(load_config(TrainConfig, None, tiny_overrides(out, shards, *extra)))
