"""Helpers shared by the README tests (test_readme.py parses the README's command blocks, test_readme_run.py runs
the LFW-62 ones): the blocks, their commands, the real CLI parsers, and the paths each command reads and writes."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import yaml

from segue_dist.cli import VERBS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GIVEN = ("../shared/",)  # inputs a user brings (the face corpus), not produced by a README command
REAL_FACES = "A run on real faces"  # the paragraph that opens the LFW-62 run's section

# Flags whose value is a path one command reads / writes.
READS = {"--generator", "--in", "--labels", "--shards", "--extractor", "--results", "--config"}
WRITES = {"--out"}


# ------------------------------------------------------------------------------------------------ blocks, commands


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


def assignment(words: list[str]) -> tuple[str, str] | None:
    """``("S", "../shared/data")`` for a shell variable assignment such as ``S=../shared/data``, else None."""
    if len(words) == 1 and re.fullmatch(r"\w+=\S+", words[0]):
        name, value = words[0].split("=", 1)
        return name, value
    return None


def readme_commands() -> list[list[str]]:
    """Every README command as words, with the README's own shell variables (S=...) substituted."""
    env: dict[str, str] = {}
    result = []
    for block in bash_blocks(README.read_text()):
        for command in commands(block):
            words = expand(shlex.split(command), env)
            if assigned := assignment(words):
                env[assigned[0]] = assigned[1]
                continue
            result.append(words)
    return result


def real_faces_blocks() -> list[str]:
    """The bash blocks of the LFW-62 run: from the paragraph "A run on real faces" to the next heading."""
    text = README.read_text()
    start = text.index(REAL_FACES)
    end = re.compile(r"^#{2,} ", flags=re.M).search(text, start)
    return bash_blocks(text[start : end.start() if end else len(text)])


# ---------------------------------------------------------------------------------------------------- the parsers


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


# ----------------------------------------------------------------------------------------------- what flows where


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in argv if "=" in w and not w.startswith("-"))


def sweep_paths(config: str, root: Path = REPO) -> tuple[list[str], str]:
    """(the shard sets an experiment config reads, the folder it writes) — runs/eval/<name> unless `out:` says."""
    data = yaml.safe_load((root / config).read_text())
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
