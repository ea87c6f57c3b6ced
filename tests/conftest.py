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


# ------------------------------------------------------------------------------------ site tests (see site_testing.py)


@pytest.fixture
def off_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Check Slurm sites as from a laptop, whatever machine runs the tests (its /scratch may not exist).

    Nothing is patched in segue_dist: the real `site.on_cluster` runs and finds no sbatch on PATH.
    """
    from site_testing import sbatch_free_path

    monkeypatch.setenv("PATH", sbatch_free_path())


@pytest.fixture
def on_login_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be on a Slurm login node: an ``sbatch`` on PATH (it is never run by `check`)."""
    from site_testing import sbatch_free_path

    bin_dir = tmp_path / "login_bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\nexit 99\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{sbatch_free_path()}")


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workstation example's 4 GPUs, counted from CUDA_VISIBLE_DEVICES (no nvidia-smi needed)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh stand-in checkout (configs/ and launch/, no shards/ or runs/) as the current folder."""
    from site_testing import make_checkout

    root = make_checkout(tmp_path / "checkout")
    monkeypatch.chdir(root)
    return root
