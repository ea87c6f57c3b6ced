"""`segue demo`: the whole path on the embedded synthetic corpus, as the README's main job.

Stages run in order and each skips work that is already done, so a rerun after an interruption picks up where it
stopped: corpus -> shards -> pseudo-labels -> train (2 processes) -> protect -> evaluate -> report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segue_dist.data.images import encode_jpeg
from segue_dist.utils.io import atomic_write_bytes
from segue_dist.utils.progress import console


def write_demo_corpus(root: Path, identities: int, per_identity: int, size: int, seed: int) -> int:
    """Write the synthetic identity folders (JPEG, as real photo corpora are); returns the image count."""
    import numpy as np

    from segue_dist.data.synthetic import generate_corpus

    count = 0
    for name, index, image in generate_corpus(identities, per_identity, size, seed):
        path = root / name / f"{index:04d}.jpg"
        if not path.exists():
            atomic_write_bytes(path, encode_jpeg(np.asarray(image), quality=92))
        count += 1
    return count


def stage_shards(out: Path, args: argparse.Namespace) -> dict:
    from segue_dist.shards import ShardsConfig, build_shards, print_summary

    corpus = out / "corpus"
    n = write_demo_corpus(corpus, args.identities, args.per_identity, args.size, args.seed)
    console.print(f"[bold]demo corpus[/]: {args.identities} identities x {args.per_identity} images at {args.size} px ({n}) in {corpus}")
    cfg = ShardsConfig(
        src=str(corpus),
        out=str(out / "shards"),
        test_per_identity=args.test_per_identity,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=1,
    )
    summary = build_shards(cfg)
    print_summary(summary, cfg.out)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where the demo writes everything")
    parser.add_argument("--identities", type=int, default=10)
    parser.add_argument("--per-identity", type=int, default=40)
    parser.add_argument("--test-per-identity", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    stage_shards(out, args)
    return 0
