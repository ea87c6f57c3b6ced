"""What `segue protect` chooses and prints around the work itself: automatic worker counts, summary tables."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
from rich.console import Console

from segue_dist.protect.options import ProtectOptions, resolve_workers


def test_protect_counts_its_cores_as_training_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """One helper (segue_dist/utils/device.py: cpus_per_process) gives protect and the training loader their share of
    the node's cores: 16 cores and 2 processes on the node make 8 each; an empty LOCAL_WORLD_SIZE is one process."""
    opts = ProtectOptions(generator="g.safetensors", inp="in", out="out")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers(opts, on_cuda=False) == (2, 4, 8)  # loader workers, encoders, G threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    assert resolve_workers(opts, on_cuda=False) == (4, 8, 16)


# A path longer than the 80 columns, as pytest's and a cluster's scratch paths are.
OUTPUT = "/tmp/pytest-of-someone/pytest-123/test_protect_summary0/runs/lfw62_true/protected/train"


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> Console:
    """An 80-column console that records what protect prints (its tables and its own lines)."""
    import segue_dist.protect.cli as cli
    import segue_dist.utils.progress as progress

    recorded = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(progress, "console", recorded)
    monkeypatch.setattr(cli, "console", recorded)
    return recorded


def shard_manifest() -> dict[str, Any]:
    return {
        "output": OUTPUT, "shards": 1, "samples_in": 10, "samples_out": 10, "quarantined": 0, "balanced": True,
        "eps_levels": 8, "eps_bound_holds": True, "measured_max_abs": 8, "mean_abs_delta": 3.2, "psnr_mean": 40.1,
        "quarantined_samples": [], "shard_errors": [],
    }  # fmt: skip


def folder_manifest() -> dict[str, Any]:
    jpeg = {"files": 3, "eps_bound_holds": None, "max_abs_delta": 9, "psnr_mean": 39.0}
    return {
        "output": OUTPUT, "files_in": 3, "written": 3, "quarantined": 0, "ignored": 0, "balanced": True,
        "face_size": 64, "metadata": "dropped", "eps_levels": 8, "formats": {"jpeg": jpeg}, "quarantined_files": [],
    }  # fmt: skip


def test_protect_tables_keep_the_output_path_whole_at_80_columns(console: Console) -> None:
    from segue_dist.protect.cli import print_folder_manifest, print_folder_summary, print_manifest, print_rank_summary
    from segue_dist.protect.folder_mode import FolderSummary
    from segue_dist.protect.shard_mode import RankSummary

    stats = [{"written": 10, "quarantined": 0, "max_abs_delta": 8, "mean_abs_delta": 3.2, "psnr_mean": 40.1}]
    print_rank_summary(RankSummary(0, 1, 1, 0, stats, seconds=2.0))
    print_manifest(shard_manifest())
    photo = {"status": "written", "max_abs": 8, "mean_abs": 3.0, "psnr": 40.0}
    print_folder_summary(FolderSummary(0, 1, 3, 0, [photo], seconds=1.0))
    print_folder_manifest(folder_manifest())
    lines = console.export_text().splitlines()
    # Each manifest names its output on a line of its own, whole, although it is longer than the console.
    assert f"segue protect: {OUTPUT}" in lines and f"segue protect (folder): {OUTPUT}" in lines
    # The tables' titles stand on one line each (rich wraps a title to its table's width).
    for title in (
        "segue protect: this rank (shards done now + earlier; |δ| in 1/255)",
        "segue protect (folder): this rank (done now + earlier; |δ| in 1/255)",
    ):
        assert any(line.strip() == title for line in lines), "\n".join(lines)
