"""Shared fixtures. Real face data comes from $SEGUE_FACES (default ../shared/data beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def faces_dir() -> Path:
    return Path(os.environ.get("SEGUE_FACES", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def faces_root() -> Path:
    root = faces_dir()
    if not (root / "glint24").is_dir() or not (root / "lfw423").is_dir():
        pytest.skip(f"real face data not found at {root} (set SEGUE_FACES to the folder holding glint24/ and lfw423/)")
    return root


@pytest.fixture(scope="session")
def glint_shards(faces_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """glint24 at 32 px: 2,019 training and 240 test faces (10 per identity), 24 identities."""
    from segue_dist.shards import ShardsConfig, build_shards

    out = tmp_path_factory.mktemp("glint24_32")
    build_shards(
        ShardsConfig(
            src=str(faces_root / "glint24"), out=str(out), test_per_identity=10, size=[32], samples_per_shard=256
        ),
        show_progress=False,
    )
    return out
