"""The README's LFW-62 command blocks, run as written (through bash, in order, in a fresh folder) on a tiny face set,
so the README cannot drift from the code again; and the README's launches never collide on a port.

What differs from the README is all in SUBSTITUTIONS below: the face folder, fewer epochs, a smaller batch, and K
for the tiny set's identities. Every command must exit 0, write what the next one reads, and print nothing a new
user would read as an error (NOISE). Both tests: 109 s on this 2-core machine while other jobs ran."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from readme_testing import REPO, assignment, commands, expand, reads_and_writes, real_faces_blocks

pytestmark = [pytest.mark.readme, pytest.mark.slow, pytest.mark.realdata]

IDENTITIES, PER_IDENTITY = 4, 20  # the tiny set: 4 identities x 20 photos (>= --min-per-identity 20: all kept)
TOO_FEW = 5  # photos of one more identity, which --min-per-identity 20 must drop

# ------------------------------------------------------------------------- what differs from the README, all of it
S_VALUE = "faces"  # S=../shared/data in the README: here a folder of IDENTITIES (+1) lfw423 identities, symlinked
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    # (the command it applies to, the README's text, what runs instead); each must apply at least once
    ("accelerate launch", "data.image_size=[64]", "data.image_size=[64] epochs=1 data.batch_size=8"),  # 12 epochs;
    # batch 8 gives 3 batches per rank per epoch from 60 photos, so loader workers start as in the real run
    ("segue evaluate sweep", "lfw62_true_labels.yaml", "lfw62_true_labels.yaml train.epochs=1"),  # victims: 8
    ("segue evaluate sweep", "lfw62_pseudo_labels.yaml", "lfw62_pseudo_labels.yaml train.epochs=1"),
    ("segue cluster", "--k 62", f"--k {IDENTITIES}"),  # K-means cannot make 62 clusters of 4 identities
]

# What a new user reads as an error. Each was printed by these commands once: the port, DeepSpeed's accelerator
# detection, torch's loader-worker warning (4 workers on 2 cores), the DDP broadcast_buffers FutureWarning.
NOISE = re.compile(r"Warning\b|\[WARNING\]|Traceback|already in use|suggested max number of worker")


def substituted(command: str) -> tuple[str, list[int]]:
    """``command`` with the SUBSTITUTIONS that apply to it, and their indices."""
    used = []
    for i, (prefix, old, new) in enumerate(SUBSTITUTIONS):
        if command.startswith(prefix) and old in command:
            command = command.replace(old, new)
            used.append(i)
    return command, used


# --------------------------------------------------------------------------------------------------- the set-up


def tiny_faces(lfw423: Path, root: Path) -> Path:
    """IDENTITIES identities with >= PER_IDENTITY photos (the first by name, PER_IDENTITY photos each) and one with
    TOO_FEW, as symlinks under root/lfw423 (no photo is copied)."""
    enough, few = [], []
    for person in sorted(p for p in lfw423.iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) >= PER_IDENTITY and len(enough) < IDENTITIES:
            enough.append(photos[:PER_IDENTITY])
        elif TOO_FEW <= len(photos) < 20 and not few:
            few.append(photos[:TOO_FEW])
        if len(enough) == IDENTITIES and few:
            break
    assert len(enough) == IDENTITIES and few, f"{lfw423} has too few identities for the tiny set"
    for photos in enough + few:
        folder = root / "lfw423" / photos[0].parent.name
        folder.mkdir(parents=True)
        for photo in photos:
            (folder / photo.name).symlink_to(photo)
    return root


@contextmanager
def port_held(port: int = 29500) -> Iterator[None]:
    """Listen on Accelerate's default port meanwhile, as another run on the machine would (if something else
    already holds it, it is busy either way)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
    except OSError:
        pass
    try:
        yield
    finally:
        sock.close()


def checkout(tmp_path: Path) -> Path:
    """A fresh folder standing for the repository root: its configs/ and .venv/ (linked), nothing built yet."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"{sys.prefix} is not a virtual environment with bin/activate (run through `make test`)")
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "configs").symlink_to(REPO / "configs")
    (root / ".venv").symlink_to(venv)
    return root


def run_bash(prelude: list[str], command: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``command`` through bash after the README's earlier `source` and `VAR=` lines, as a user's shell has them."""
    script = "\n".join(["set -e", *prelude, command])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    return proc, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ what each one leaves


def check_outputs(words: list[str], root: Path) -> None:
    """What the command wrote, and what the next command reads from it."""
    _, writes = reads_and_writes(words)
    for path in writes:
        assert (root / path).exists(), f"`{shlex.join(words)}` did not write {path}"
    out = root / writes[0] if writes else root
    if words[:3] == ["segue", "shards", "build"]:
        labels = json.loads((out / "train" / "labels.json").read_text())["labels"]
        assert len(labels) == IDENTITIES, labels  # the identity with TOO_FEW photos is dropped
        for split in ("train", "test"):
            assert (out / split / "sizes.json").is_file()
    elif words[:2] == ["accelerate", "launch"]:
        assert (out / "generator.safetensors").is_file() and (out / "generator.json").is_file()
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["world_size"] == 2, summary  # `--cpu --num_processes 2` would have started one process
        assert summary["ranks_in_sync"], summary
    elif words[:2] == ["segue", "protect"]:
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["balanced"] and manifest["eps_bound_holds"] and manifest["samples_out"] > 0, manifest
    elif words[:2] == ["segue", "cluster"]:
        labels = json.loads((out / "pseudo_labels.json").read_text())
        assert labels, "empty pseudo-label sidecar"
    elif words[1:3] == ["evaluate", "sweep"]:
        from segue_dist.config import load_config
        from segue_dist.evaluate.config import SweepConfig
        from segue_dist.evaluate.sweep import plan_rows

        config = words[words.index("--config") + 1]
        overrides = [w for w in words[words.index("--config") + 2 :] if "=" in w]
        cfg = load_config(SweepConfig, root / config, overrides)
        results = json.loads((out / "results.json").read_text())
        assert sorted(r["name"] for r in results["rows"]) == sorted(r.name for r in plan_rows(cfg))
    elif words[:2] == ["segue", "report"]:
        assert "# Segue evaluation report" in (out / "report.md").read_text()
        assert (out / "report.html").stat().st_size > 0


# ------------------------------------------------------------------------------------------------------- the test


def test_the_readme_lfw62_blocks_run_as_written(faces_root: Path, tmp_path: Path) -> None:
    root = checkout(tmp_path)
    tiny_faces(faces_root / "lfw423", root / S_VALUE)
    prelude: list[str] = []
    env: dict[str, str] = {}
    used: set[int] = set()
    ran, times = [], []
    with port_held():
        for block in real_faces_blocks():
            for readme_command in commands(block):
                words = shlex.split(readme_command)
                if (assigned := assignment(words)) or words[0] == "source":
                    if assigned and assigned[0] == "S":
                        readme_command = f"S={S_VALUE}"
                    prelude.append(readme_command)
                    if assigned := assignment(shlex.split(readme_command)):
                        env[assigned[0]] = assigned[1]
                    continue
                command, applied = substituted(readme_command)
                used.update(applied)
                words = expand(shlex.split(command), env)
                for path in reads_and_writes(words)[0]:
                    assert (root / path).exists(), f"`{command}` reads {path}, which is not there"
                proc, seconds = run_bash(prelude, command, root)
                output = proc.stdout + proc.stderr
                assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{output[-4000:]}"
                noise = sorted({line.strip() for line in output.splitlines() if NOISE.search(line)})
                assert not noise, f"`{command}` printed:\n" + "\n".join(noise)
                check_outputs(words, root)
                ran.append(words[:3])
                times.append(f"{seconds:6.1f} s  {command[:100]}")
    assert used == set(range(len(SUBSTITUTIONS))), (
        f"substitutions that no longer apply: {set(range(len(SUBSTITUTIONS))) - used}"
    )
    assert [w[:2] for w in ran].count(["accelerate", "launch"]) == 2 and len(ran) >= 10, ran
    print("\n".join(times))


# ----------------------------------------------------------------------------------------------------- the ports

PROBE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
print(f"rank {dist.get_rank()} world {dist.get_world_size()} sum {int(total.item())} port {os.environ['MASTER_PORT']}")
dist.destroy_process_group()
"""


def test_two_readme_launches_at_once_do_not_collide(tmp_path: Path) -> None:
    """Two launches with the README's Accelerate config, at once, while another job holds 29500: each gets two
    processes that meet (world size 2) on a port of its own, and neither prints "already in use"."""
    configs = {
        w[w.index("--config_file") + 1]
        for block in real_faces_blocks()
        for w in map(shlex.split, commands(block))
        if w[:2] == ["accelerate", "launch"]
    }
    assert configs == {"configs/accelerate/cpu_2proc.yaml"}, configs
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / configs.pop()), str(probe)]
    with port_held():
        procs = [
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in "ab"
        ]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    ports = []
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
        assert not NOISE.search(output), output[-3000:]
        lines = sorted(re.findall(r"rank (\d) world (\d) sum (\d) port (\d+)", output))
        assert [line[:3] for line in lines] == [("0", "2", "2"), ("1", "2", "2")], output[-3000:]
        ports.append(lines[0][3])
    assert "29500" not in ports and ports[0] != ports[1], ports
