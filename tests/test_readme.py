"""The README's command blocks run as written: real verbs and flags, existing configs, and each command reads what an
earlier one wrote (fast: commands are parsed, never run; tests/test_readme_run.py runs the LFW-62 blocks)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from readme_testing import (
    REPO,
    overrides,
    parse_segue,
    produced,
    readme_commands,
    reads_and_writes,
    real_faces_blocks,
    train_argv,
)

SEGUE = [w for w in readme_commands() if w[0] in ("segue", ".venv/bin/segue")]
LAUNCHES = [w for w in readme_commands() if w[:2] == ["accelerate", "launch"]]


def test_the_readme_has_the_lfw62_commands() -> None:
    """The control: a README without the run's commands would pass everything below vacuously."""
    verbs = {w[1] for w in SEGUE}
    assert {"shards", "cluster", "protect", "evaluate", "report", "site"} <= verbs
    assert len(LAUNCHES) >= 2


def test_no_placeholder_in_a_command() -> None:
    for words in readme_commands():
        assert not any("..." in w for w in words), f"a literal '...' in `{shlex.join(words)}`"


def test_the_readme_says_to_activate_the_venv_before_segue() -> None:
    """`segue` and `accelerate` live in .venv: the first command that calls them must come after the activation."""
    words = [w for w in readme_commands() if w[0] in ("source", "segue", "accelerate")]
    assert words and words[0] == ["source", ".venv/bin/activate"], words[:2]


@pytest.mark.parametrize("words", SEGUE, ids=lambda w: " ".join(w[:3]))
def test_segue_command_parses_and_its_config_exists(words: list[str]) -> None:
    args = parse_segue(words)
    config = getattr(args, "config", None)
    if config:
        assert (REPO / config).is_file(), config


@pytest.mark.parametrize("words", LAUNCHES, ids=lambda w: " ".join(w[-2:]))
def test_training_launch_parses_and_its_overrides_load(words: list[str]) -> None:
    from segue_dist.config import load_config
    from segue_dist.training.config import TrainConfig

    args = parse_segue(["segue", "train", *train_argv(words)])
    assert (REPO / args.config).is_file()
    load_config(TrainConfig, REPO / args.config, args.overrides)  # an unknown key or a wrong type raises


def test_the_real_faces_section_has_the_two_blocks_the_run_test_runs() -> None:
    """tests/test_readme_run.py runs these two blocks: the supervised run, then the pseudo-label one."""
    supervised, pseudo = real_faces_blocks()
    assert "source .venv/bin/activate" in supervised and "segue shards build" in supervised
    assert "segue cluster" in pseudo and "pseudo_labels.json" in pseudo
    for block in (supervised, pseudo):
        assert "accelerate launch" in block and "segue evaluate sweep" in block and "segue report" in block


@pytest.mark.parametrize("config", sorted(REPO.glob("configs/accelerate/*.yaml")), ids=lambda p: p.stem)
def test_one_machine_launch_configs_pick_a_free_port(config: Path) -> None:
    """Accelerate's default port is 29500 for every run: a second run on the machine (the demo, a test, the other
    LFW-62 launch) then prints "Port 29500 is already in use". On one machine `main_process_port: 0` makes
    Accelerate pick a free port per launch (tests/test_readme_run.py launches two at once); several machines must
    meet at one named port, which launch/ passes per job."""
    data = yaml.safe_load(config.read_text())
    if data.get("num_machines", 1) == 1 and data.get("num_processes", 1) > 1:
        assert data.get("main_process_port") == 0, f"{config.name}: main_process_port: 0 (a free port per launch)"
    else:
        assert data.get("main_process_port") != 0 or data.get("num_processes", 1) == 1, config.name


def test_a_bad_flag_is_caught() -> None:
    """The control for the parse tests: an unknown flag fails, a real one passes."""
    with pytest.raises(AssertionError, match="does not parse"):
        parse_segue(["segue", "protect", "--generatr", "g", "--in", "a", "--out", "b"])
    parse_segue(["segue", "protect", "--generator", "g", "--in", "a", "--out", "b"])


# ----------------------------------------------------------------------------------------------- what flows where


def flow_commands() -> list[list[str]]:
    """The real-faces run: every command from the first LFW-62 shard build to the last report."""
    all_words = readme_commands()
    first = next(i for i, w in enumerate(all_words) if w[:3] == ["segue", "shards", "build"])
    return [w for w in all_words[first:] if w[0] in ("segue", "accelerate") and w[1] not in ("site",)]


def test_each_command_reads_what_an_earlier_one_wrote() -> None:
    outputs: list[str] = []
    for words in flow_commands():
        reads, writes = reads_and_writes(words)
        for path in reads:
            assert produced(path, outputs), f"`{shlex.join(words)}` reads {path}, which no earlier command writes"
        outputs += writes
    # The two runs the experiment configs describe both reach their report.
    assert {"runs/eval/lfw62_true_labels", "runs/eval/lfw62_pseudo_labels"} <= set(outputs)


def protected_sets(config: str) -> list[str]:
    data = yaml.safe_load((REPO / config).read_text())
    return [m["train"] for m in data.get("methods", []) if m.get("train")]


def test_protect_writes_exactly_what_the_sweeps_read() -> None:
    """A prefix match is not enough here: train's out=runs/lfw62_true is a parent of the sweep's protected set."""
    protect_outs = {w[w.index("--out") + 1] for w in flow_commands() if w[:2] == ["segue", "protect"]}
    sweeps = [w[w.index("--config") + 1] for w in flow_commands() if w[1:3] == ["evaluate", "sweep"]]
    assert len(sweeps) == 2
    for config in sweeps:
        assert set(protected_sets(config)) <= protect_outs, (config, protect_outs)


def test_the_flow_check_catches_a_wrong_path() -> None:
    """The control: the README's old protect path (not the one the sweep reads) is caught."""
    reads = protected_sets("configs/experiments/lfw62_true_labels.yaml")
    assert not set(reads) <= {"shards/lfw62-protected/train"}
    assert not produced(reads[0], ["shards/lfw62", "shards/lfw62-protected/train"])


def test_shard_and_training_sizes_agree() -> None:
    """The shard builds, the training lines and the experiment headers all use one image size."""
    sizes = {w[w.index("--size") + 1] for w in flow_commands() if "--size" in w}
    sizes |= {overrides(train_argv(w))["data.image_size"].strip("[]") for w in LAUNCHES}
    for config in REPO.glob("configs/experiments/lfw62_*.yaml"):
        sizes |= set(re.findall(r"--size (\d+)", config.read_text()))
    assert sizes == {"64"}, sizes


def test_other_readme_files_exist() -> None:
    """Scripts, configs and test files the README's blocks name."""
    for words in readme_commands():
        for w in words:
            if re.fullmatch(r"(launch|configs|tests)/[\w./-]+\.(sh|yaml|py)", w):
                assert (REPO / w).is_file(), w
