"""The README's command blocks run as written: real verbs and flags, existing configs, and each command reads what an
earlier one wrote (fast: commands are parsed, never run)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from segue_dist.cli import VERBS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GIVEN = ("../shared/",)  # inputs a user brings (the face corpus), not produced by a README command

# Flags whose value is a path one command reads / writes.
READS = {"--generator", "--in", "--labels", "--shards", "--extractor", "--results", "--config"}
WRITES = {"--out"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]


def readme_commands() -> list[list[str]]:
    """Every README command as words, with the README's own shell variables (S=...) substituted."""
    env: dict[str, str] = {}
    result = []
    for block in bash_blocks(README.read_text()):
        for command in commands(block):
            words = expand(shlex.split(command), env)
            if len(words) == 1 and re.fullmatch(r"\w+=\S+", words[0]):
                name, value = words[0].split("=", 1)
                env[name] = value
                continue
            result.append(words)
    return result


def verb_parser(verb: str) -> argparse.ArgumentParser:
    """The real parser of `segue <verb>` (what `segue <verb> --help` shows)."""
    parser = argparse.ArgumentParser(prog=f"segue {verb}", exit_on_error=False)
    importlib.import_module(VERBS[verb][0]).add_arguments(parser)
    return parser


def parse_segue(words: list[str]) -> argparse.Namespace:
    verb = words[1]
    assert verb in VERBS, f"`segue {verb}` is not a verb: {sorted(VERBS)}"
    try:
        return verb_parser(verb).parse_args(words[2:])
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad choice
        raise AssertionError(f"`{shlex.join(words)}` does not parse") from exc


def train_argv(words: list[str]) -> list[str]:
    """The `-m segue_dist.train ...` part of an `accelerate launch` line, checking the launcher's own config file."""
    assert words[:2] == ["accelerate", "launch"]
    config = words[words.index("--config_file") + 1]
    assert (REPO / config).is_file(), config
    module = words.index("-m")
    assert words[module + 1] == "segue_dist.train", words
    return words[module + 2 :]


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


def test_a_bad_flag_is_caught() -> None:
    """The control for the parse tests: an unknown flag fails, a real one passes."""
    with pytest.raises(AssertionError, match="does not parse"):
        parse_segue(["segue", "protect", "--generatr", "g", "--in", "a", "--out", "b"])
    parse_segue(["segue", "protect", "--generator", "g", "--in", "a", "--out", "b"])


# ----------------------------------------------------------------------------------------------- what flows where


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in argv if "=" in w and not w.startswith("-"))


def sweep_paths(config: str) -> tuple[list[str], str]:
    """(the shard sets an experiment config reads, the folder it writes) — runs/eval/<name> unless `out:` says."""
    data = yaml.safe_load((REPO / config).read_text())
    reads = [data["data"]["clean_train"], data["data"]["test"]]
    reads += [m["train"] for m in data.get("methods", []) if m.get("train")]
    return reads, data.get("out") or f"runs/eval/{data['name']}"


def reads_and_writes(words: list[str]) -> tuple[list[str], list[str]]:
    """The paths a README command reads and writes."""
    if words[:2] == ["accelerate", "launch"]:
        o = overrides(train_argv(words))
        return [o[k] for k in ("data.train", "data.labels") if k in o], [o["out"]]
    if words[1:3] == ["evaluate", "sweep"]:
        reads, out = sweep_paths(words[words.index("--config") + 1])
        return reads, [out]
    pairs = list(zip(words, words[1:], strict=False))
    reads = [v for flag, v in pairs if flag in READS and not v.startswith("configs/")]
    reads += [v for flag, v in pairs if flag == "--src"]
    return reads, [v for flag, v in pairs if flag in WRITES]


def produced(path: str, outputs: list[str]) -> bool:
    return path.startswith(GIVEN) or any(path == o or path.startswith(o.rstrip("/") + "/") for o in outputs)


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
