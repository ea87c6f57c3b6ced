"""Pretrained-embedding attackers (dlib descriptor): enrol the training photos, identify clean test photos.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/enrolment_attack.py --name glint24_32 \
        --enrol clean=shards/glint24_32/train --enrol segue=runs/protected/glint24_32/train \
        --probe shards/glint24_32/test --out bench/results/enrolment/glint24_32.json

Each --enrol NAME=SPLIT (clean, or a protected copy with the same keys and labels) is embedded once with the
cluster stage's feature code (cached under --work, ignored by git) and attacked three ways
(`segue_dist.metrics.enrolment`): 1-NN, class mean, linear probe, top-1 on the clean probe split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segue_dist.cluster import extract_features, load_feature_model, load_features  # noqa: E402
from segue_dist.data.loader import open_shard_set  # noqa: E402
from segue_dist.metrics.enrolment import enrolment_report  # noqa: E402
from segue_dist.utils.io import atomic_write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def embed(split: str, work: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(embeddings, true labels, counts) of every sample of ``split``; cached in ``work``."""
    model, _ = load_feature_model("dlib")  # a fresh one per split: its detection counts are per split
    t0 = time.perf_counter()
    counts = extract_features(split, model, work, image_size=None, num_workers=0, show_progress=False)
    names = sorted(Path(s).name for s in open_shard_set(split).shards)
    x, _, labels = load_features(work, names)
    return x, labels, {**counts, "seconds": time.perf_counter() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--enrol", action="append", required=True, help="NAME=SPLIT (repeat: clean, protected...)")
    parser.add_argument("--probe", required=True, help="clean test split")
    parser.add_argument("--work", default="", help="feature cache (default runs/bench_enrolment/NAME)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work or REPO / "runs" / "bench_enrolment" / args.name)
    probe_x, probe_y, probe_counts = embed(args.probe, work / "probe")
    rows: dict[str, Any] = {}
    for item in args.enrol:
        name, sep, split = item.partition("=")
        if not sep or not name or not split:
            parser.error(f"--enrol must be NAME=SPLIT, got {item!r}")
        x, y, counts = embed(split, work / name)
        rows[name] = {"split": split, "features": counts, **enrolment_report(x, y, probe_x, probe_y)}
        print(name, {k: v for k, v in rows[name].items() if k != "features"})
    atomic_write_json(
        Path(args.out),
        {
            "name": args.name,
            "extractor": "dlib (face-recognition-models 0.3.0)",
            "feature_model_sha256": load_feature_model("dlib")[1]["sha256"],
            "probe": {"split": args.probe, "features": probe_counts},
            "enrolment": rows,
            "loadavg_at_end": os.getloadavg(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
