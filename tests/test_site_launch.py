"""`segue site submit`: rendered batch scripts, a simulated Slurm job, the workstation and localhost launchers.

The Slurm job itself is simulated: fake `srun`, `scontrol` and `accelerate` executables on PATH run the rendered
batch script the way Slurm would (the batch shell on node 0, then one srun task per node), so the test sees the exact
launcher each node would start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from site_testing import REPO, ci_site, segue, shellcheck

from segue_dist import site
from segue_dist.site import Tools, node_command, plan_stage, stage_args

# --------------------------------------------------------------------------------------------------- submit, Slurm


def render(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert segue("submit", *argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def commands_only(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.usefixtures("off_cluster")
def test_submit_dry_run_renders_sbatch_lines_from_the_site(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(REPO / "configs/sites/example_slurm.yaml")
    script = render(capsys, example, "train", "--dry-run", "--", "--config", "configs/train/default.yaml")
    lines = script.splitlines()
    for directive in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--partition=gpu",
        "--account=proj0123",
        "--qos=normal",
        "--time=2-00:00:00",
        "--exclusive",
    ):
        assert f"#SBATCH {directive}" in lines, directive
    # sbatch stops reading directives at the first command: all of them must come before it.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    # Time limits are per stage.
    assert "#SBATCH --time=08:00:00" in render(capsys, example, "protect", "--dry-run").splitlines()
    shards = render(capsys, example, "shards", "--dry-run").splitlines()
    assert "#SBATCH --nodes=1" in shards and not any(line.startswith("#SBATCH --gpus") for line in shards)


@pytest.mark.usefixtures("off_cluster")
@pytest.mark.parametrize("stage", site.STAGES)
def test_rendered_script_is_valid_bash(stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / f"{stage}.sbatch"
    script.write_text(render(capsys, str(REPO / "configs/sites/example_slurm.yaml"), stage, "--dry-run"))
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    # The site's own set-up lines may draw style notes; nothing worse.
    result = subprocess.run([shellcheck(), "--severity=warning", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.usefixtures("off_cluster")
def test_stage_resources_override_the_site(capsys: pytest.CaptureFixture[str]) -> None:
    lines = render(capsys, str(REPO / "configs/sites/example_slurm.yaml"), "evaluate", "--dry-run").splitlines()
    assert "#SBATCH --cpus-per-task=8" in lines and "#SBATCH --gpus-per-node=1" in lines
    assert "#SBATCH --exclusive" not in lines  # only the multi-node stages take whole nodes


@pytest.mark.usefixtures("off_cluster")
def test_rank_variables_are_left_to_the_per_node_script(capsys: pytest.CaptureFixture[str]) -> None:
    script = render(capsys, str(REPO / "configs/sites/example_slurm.yaml"), "train", "--dry-run")
    body = "\n".join(commands_only(script))
    # Nothing rank-specific is computed in the batch script: no machine rank, no SLURM_NODEID, no hostnames.
    assert "--machine_rank" not in body and "SLURM_NODEID" not in body and "scontrol" not in body
    assert 'bash launch/slurm/node_launch.sh segue_dist.train "$@"' in body
    assert '--cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"' in body  # srun no longer inherits it (Slurm >= 22.05)
    node_launch = "\n".join(commands_only((REPO / "launch/slurm/node_launch.sh").read_text()))
    assert 'node_rank="${SLURM_NODEID:?' in node_launch and '--machine_rank "$node_rank"' in node_launch
    assert 'scontrol show hostnames "${SLURM_JOB_NODELIST' in node_launch


FAKE_SRUN = """#!/bin/bash
# Slurm stand-in: record srun's options, then run the command once per node with that node's SLURM_NODEID.
while [ $# -gt 0 ] && [[ $1 == --* ]]; do echo "$1" >> "$FAKE_OUT/srun_options"; shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || exit 1
for i in $(seq 1 "$SLURM_NNODES"); do printf 'gpu%03d\\n' "$i"; done
"""
FAKE_ACCELERATE = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_OUT/node$SLURM_NODEID.args"
"""


def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(tmp_path: Path, bin_dir: Path, nodes: int) -> dict[str, str]:
    # The batch shell runs on node 0, where SLURM_NODEID is 0: the value every node would get if it were
    # expanded there.
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_OUT": str(tmp_path),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODEID": "0",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(REPO),
    }


@pytest.mark.usefixtures("off_cluster")
def test_simulated_slurm_job_starts_each_node_with_its_own_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = REPO / "configs/sites/example_slurm.yaml"
    overrides = ["--set", "env.setup=[]", "--set", f"paths.workdir={REPO}"]
    user = ["--config", "configs/train/default.yaml", "epochs=2"]
    script = render(capsys, str(example), "train", "--dry-run", *overrides, "--", *user)
    (tmp_path / "job.sbatch").write_text(script)
    result = subprocess.run(
        ["bash", str(tmp_path / "job.sbatch")],
        env=slurm_env(tmp_path, fake_bin(tmp_path), 4),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    s = site.load_site(example, ["env.setup=[]", f"paths.workdir={REPO}"])
    stage_plan = plan_stage(s, "train")
    port = 20000 + 4242 % 20000
    for node in range(4):
        got = (tmp_path / f"node{node}.args").read_text().splitlines()
        expected = node_command(stage_plan, node, "gpu001", port, stage_args(s, "train", user), Tools())[1:]
        assert got == expected  # the bash launcher and `segue site check`'s table agree, argument for argument
    ranks = [(tmp_path / f"node{n}.args").read_text().splitlines() for n in range(4)]
    assert [r[r.index("--machine_rank") + 1] for r in ranks] == ["0", "1", "2", "3"]
    assert "--cpus-per-task=64" in (tmp_path / "srun_options").read_text().split()


def test_fake_srun_reproduces_the_pitfall_the_wrapper_avoids(tmp_path: Path) -> None:
    # Control: the naive inline form expands $SLURM_NODEID in the batch shell, so every node says 0.
    naive = 'srun --ntasks-per-node=1 bash -c "echo rank $SLURM_NODEID"'
    env = slurm_env(tmp_path, fake_bin(tmp_path), 3)
    result = subprocess.run(["bash", "-c", naive], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["rank", "0"] * 3
    quoted = "srun --ntasks-per-node=1 bash -c 'echo rank $SLURM_NODEID'"
    result = subprocess.run(["bash", "-c", quoted], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["rank", "0", "rank", "1", "rank", "2"]


def test_node_launch_uses_static_rendezvous_on_one_node(tmp_path: Path) -> None:
    env = {**slurm_env(tmp_path, fake_bin(tmp_path), 1), "SEGUE_PROCS_PER_NODE": "4", "SEGUE_MAIN_PORT": "29612"}
    subprocess.run(
        ["bash", "launch/slurm/node_launch.sh", "segue_dist.protect", "--in", "x"], cwd=REPO, env=env, check=True
    )
    args = (tmp_path / "node0.args").read_text().splitlines()
    assert args[args.index("--rdzv_backend") + 1] == "static"
    assert args[args.index("--num_processes") + 1] == "4" and args[args.index("--main_process_port") + 1] == "29612"
    assert args[-4:] == ["-m", "segue_dist.protect", "--in", "x"]


# ---------------------------------------------------------------------------------------------- submit, workstation


@pytest.mark.usefixtures("checkout", "four_gpus")
def test_workstation_dry_run_prints_one_launcher_with_a_process_per_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    out = render(capsys, str(REPO / "configs/sites/workstation.yaml"), "train", "--dry-run", "--", "epochs=1")
    (command,) = [line for line in out.splitlines() if not line.startswith("#")]
    assert "launch --config_file configs/accelerate/multi_gpu.yaml --num_machines 1 --num_processes 4" in command
    assert "--rdzv_backend static -m segue_dist.train" in command and "epochs=1" in command


def test_ci_localhost_dry_run_prints_two_node_launchers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = render(capsys, str(ci_site(tmp_path)), "protect", "--dry-run")
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(commands) == 2
    for node, command in enumerate(commands):
        assert f"--machine_rank {node} --main_process_ip 127.0.0.1" in command and "--rdzv_backend c10d" in command


@pytest.mark.parametrize(
    ("env", "processes", "config"),
    [
        ({"SEGUE_GPUS": "3"}, "3", "multi_gpu.yaml"),
        ({"CUDA_VISIBLE_DEVICES": "2,5"}, "2", "multi_gpu.yaml"),
        ({"SEGUE_GPUS": "1"}, "1", "single_gpu.yaml"),
    ],
)
def test_local_multi_gpu_script(tmp_path: Path, env: dict[str, str], processes: str, config: str) -> None:
    bin_dir = fake_bin(tmp_path)
    run_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SEGUE_GPUS")}
    run_env.update(env, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_OUT=str(tmp_path), SLURM_NODEID="w")
    subprocess.run(["bash", str(REPO / "launch/local_multi_gpu.sh"), "train", "epochs=1"], env=run_env, check=True)
    args = (tmp_path / "nodew.args").read_text().splitlines()
    assert args[args.index("--num_processes") + 1] == processes
    assert args[args.index("--config_file") + 1] == f"configs/accelerate/{config}"
    assert args[-3:] == ["-m", "segue_dist.train", "epochs=1"]
    bad = subprocess.run(["bash", str(REPO / "launch/local_multi_gpu.sh"), "shards"], env=run_env, capture_output=True)
    assert bad.returncode == 2


def test_local_nodes_stop_together_when_one_fails(tmp_path: Path) -> None:
    # Node 0 listens (the rendezvous store) and starts a rank that would run for a minute; node 1 crashes. Waiting
    # for node 0 would mean waiting out the rendezvous timeout: its whole session must be stopped instead.
    port = site.free_port()
    rank_pid = tmp_path / "rank.pid"
    node0 = [
        sys.executable,
        "-c",
        "import socket, subprocess, time, pathlib\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
        f"pathlib.Path({str(rank_pid)!r}).write_text(str(subprocess.Popen(['sleep', '60']).pid))\n"
        "time.sleep(60)",
    ]
    node1 = ["bash", "-c", f"while [ ! -s {rank_pid} ]; do sleep 0.1; done; echo crashed; exit 3"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    started = time.monotonic()
    assert site.run_local_nodes([node0, node1], tmp_path, dict(os.environ), logs, port) == 1
    assert time.monotonic() - started < 30
    assert "crashed" in logs[1].read_text()
    rank = Path(f"/proc/{rank_pid.read_text()}/status")
    assert not rank.exists() or "zombie" in rank.read_text()  # the crashed job's ranks are gone, not orphaned
