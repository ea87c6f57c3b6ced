"""Site files and `segue site check`, the launch scripts and the Accelerate configs (fast: no training, no launch).

Submitting (rendered batch scripts, the simulated Slurm job, local launchers): test_site_launch.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from site_testing import REPO, SITES, ci_site, make_checkout, segue, shellcheck

from segue_dist import cli, site
from segue_dist.site import StagePlan, plan_stage, stage_args

SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/slurm/*")])
ACCELERATE_CONFIGS = sorted(REPO.glob("configs/accelerate/*.yaml"))


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
