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
