"""What `segue protect` chooses and prints around the work itself: automatic worker counts, summary tables."""

from __future__ import annotations

import os

import pytest

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
