"""Multi-node rehearsal on one machine: two "nodes" (two separate `accelerate launch` processes with c10d
rendezvous on 127.0.0.1, one gloo rank each) started by `segue site submit configs/sites/ci_localhost.yaml`, the same
per-node launcher a Slurm node runs.

Training on 2 nodes x 1 rank must match a single-node 2-process run bit for bit (losses and generator bytes), and
protect on 2 nodes must write the same shard bytes as one process. Four launches of ~15-40 s each on a synthetic corpus
(32 px, generator width 8), so it stays well under three minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITE = REPO / "configs/sites/ci_localhost.yaml"
# Tiny Algorithm 1: epoch 1 trains f, epoch 2 trains G; 2 batches of 8 per rank per epoch.
TRAIN_ARGS = [
    "data.image_size=[32]",
    "data.batch_size=8",
    "data.samples_per_epoch=32",
    "data.shuffle_buffer=64",
    "generator.width=8",
    "generator.num_res_blocks=1",
    "epochs=2",
    "f_every=2",
    "tensorboard=false",
    "log_every=1",
]
PROTECT_ARGS = ["--encode-workers", "1", "--threads", "1", "--no-progress"]
LAUNCH_TIMEOUT = 300

pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    # One intra-op thread in every run: CPU float kernels give thread-count-dependent low bits.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def submit(stage: str, root: Path, *stage_args: str) -> None:
    """`segue site submit ci_localhost.yaml <stage>`: two concurrent node launchers on localhost."""
    paths = [f"paths.shards={root / 'shards'}", f"paths.outputs={root / 'nodes2'}", f"paths.logs={root / 'logs'}"]
    sets = [x for p in paths for x in ("--set", p)]
    run([sys.executable, "-m", "segue_dist.cli", "site", "submit", str(SITE), stage, *sets, "--", *stage_args])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic demo corpus (4 identities x 24 images, 32 px) in 4 train shards of 20."""
    from segue_dist.data.images import encode_jpeg
    from segue_dist.data.synthetic import generate_corpus
    from segue_dist.shards import ShardsConfig, build_shards

    root = tmp_path_factory.mktemp("rehearsal")
    for name, index, image in generate_corpus(identities=4, per_identity=24, size=32, seed=0):
        path = root / "corpus" / name / f"{index:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(np.asarray(image), quality=92))
    cfg = ShardsConfig(
        src=str(root / "corpus"), out=str(root / "shards"), test_per_identity=4, samples_per_shard=20, workers=1
    )
    build_shards(cfg, show_progress=False)
    assert len(list((root / "shards" / "train").glob("*.tar"))) == 4
    return root


@pytest.fixture(scope="module")
def trained(root: Path) -> tuple[dict, dict]:
    """(single node x 2 processes, 2 nodes x 1 process) training summaries, same config."""
    single = root / "single" / "train"
    run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu_2proc.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            "0",  # a free port: other test runs may share this machine
            "-m",
            "segue_dist.train",
            f"out={single}",
            f"data.train={root / 'shards' / 'train'}",
            "data.num_workers=1",
            *TRAIN_ARGS,
        ]
    )
    submit("train", root, *TRAIN_ARGS)  # out= and data.train= come from the site's paths
    reference = json.loads((single / "train_summary.json").read_text())
    rehearsal = json.loads((root / "nodes2" / "train" / "train_summary.json").read_text())
    return reference, rehearsal


def test_two_node_training_matches_single_node(root: Path, trained: tuple[dict, dict]) -> None:
    reference, rehearsal = trained
    assert rehearsal["world_size"] == reference["world_size"] == 2
    assert rehearsal["ranks_in_sync"] is True
    assert [h["stage"] for h in rehearsal["history"]] == ["f", "g"]
    for key in ("loss", "f_ce_on_unlearnable", "g_objective", "g_ce", "delta_l2"):
        assert [h[key] for h in rehearsal["history"]] == [h[key] for h in reference["history"]], key
    assert rehearsal["steps"] == reference["steps"]
    single = (root / "single" / "train" / "generator.safetensors").read_bytes()
    assert (root / "nodes2" / "train" / "generator.safetensors").read_bytes() == single
    # Both node launchers ran (and logged) separately.
    assert sorted(p.name for p in (root / "logs").glob("train-node*.log")) == ["train-node0.log", "train-node1.log"]


def test_two_node_protect_matches_one_process(root: Path, trained: tuple[dict, dict]) -> None:
    generator = root / "nodes2" / "train"
    one = root / "single" / "protected"
    run(
        [
            sys.executable,
            "-m",
            "segue_dist.protect",
            "--generator",
            str(generator),
            "--in",
            str(root / "shards" / "train"),
            "--out",
            str(one),
            "--workers",
            "1",
            *PROTECT_ARGS,
        ]
    )
    submit("protect", root, *PROTECT_ARGS)  # --generator, --in, --out, --workers from the site
    two = root / "nodes2" / "protected" / "train"
    tars = sorted(p.name for p in one.glob("*.tar"))
    assert tars == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert sorted(p.name for p in two.glob("*.tar")) == tars
    for name in [*tars, "sizes.json", "labels.json"]:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    # Shards were split between the two nodes' ranks (static assignment: shard i -> rank i % 2).
    ranks = {json.loads((two / f"{t[:-4]}._stats.json").read_text())["rank"] for t in tars}
    assert ranks == {0, 1}
    manifest = json.loads((two / "_manifest.json").read_text())
    assert manifest["balanced"] is True and manifest["samples_out"] == 80
