"""Config loader: unknown keys, types, overrides, `8/255`, nested dataclasses, resolved copy; CLI errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from segue_dist.config import ConfigError, config_hash, from_dict, load_config, parse_override, save_resolved
from segue_dist.shards import ShardsConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    eps: float = 8 / 255
    steps: int = 10
    kind: Literal["pgd", "fgsm"] = "pgd"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class Outer:
    name: str = "run"
    lr: float = 0.1
    sizes: list[int] = field(default_factory=lambda: [64])
    pair: tuple[int, int] = (1, 2)
    resume: str | None = None
    flag: bool = False
    attack: Inner = field(default_factory=Inner)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file() -> None:
    assert load_config(Outer) == Outer()


def test_unknown_key_names_key_and_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Outer, write_yaml(tmp_path, "nme: x\n"))
    msg = str(err.value)
    assert "'nme'" in msg
    for allowed in ("name", "lr", "attack", "flag"):
        assert allowed in msg


def test_unknown_nested_key_names_dotted_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Outer, write_yaml(tmp_path, "attack:\n  stpes: 3\n"))
    assert "'attack.stpes'" in str(err.value)
    assert "steps" in str(err.value) and "eps" in str(err.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("lr: fast\n", "lr"),
        ("attack:\n  steps: 2.5\n", "attack.steps"),
        ("attack:\n  steps: true\n", "attack.steps"),
        ("flag: 1\n", "flag"),
        ("sizes: 64\n", "sizes"),
        ("sizes: [64, x]\n", "sizes[1]"),
        ("name: [a, b]\n", "name"),
        ("name:\n", "name"),
        ("attack:\n  kind: cw\n", "attack.kind"),
        ("attack: 3\n", "attack"),
    ],
)
def test_bad_type_names_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Outer, write_yaml(tmp_path, text))
    assert key in str(err.value)


def test_validation_error_from_post_init_is_config_error() -> None:
    with pytest.raises(ConfigError, match="steps"):
        from_dict(Outer, {"attack": {"steps": 0}})


def test_overrides_dotted_and_typed(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "name: base\nattack:\n  steps: 5\n")
    cfg = load_config(
        Outer,
        path,
        ["attack.steps=7", "attack.eps=4/255", "lr=1e-3", "sizes=[32, 48]", "flag=true", "resume=null", "--name=x=y"],
    )
    assert cfg.attack == Inner(eps=4 / 255, steps=7, kind="pgd")
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.sizes == [32, 48]
    assert cfg.flag is True and cfg.resume is None
    assert cfg.name == "x=y"  # only the first '=' separates key and value; a leading '--' is allowed


def test_override_without_equals_is_error() -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("attack.steps")


@pytest.mark.parametrize(("text", "value"), [("8/255", 8 / 255), ("1e-3", 1e-3), (" 2 / 4 ", 0.5), ("3", 3.0)])
def test_float_parsing(tmp_path: Path, text: str, value: float) -> None:
    cfg = load_config(Outer, write_yaml(tmp_path, f"lr: {text}\nattack:\n  eps: {text}\n"))
    assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(value)
    assert cfg.attack.eps == pytest.approx(value)


@pytest.mark.parametrize("text", ["8/0", "8/x", "a/b/c"])
def test_bad_fraction_is_error(text: str) -> None:
    with pytest.raises(ConfigError, match="lr"):
        from_dict(Outer, {"lr": text})


def test_nested_dataclass_and_tuple() -> None:
    cfg = from_dict(Outer, {"attack": {"kind": "fgsm"}, "pair": [3, 4]})
    assert isinstance(cfg.attack, Inner) and cfg.attack.kind == "fgsm" and cfg.attack.steps == 10
    assert cfg.pair == (3, 4)


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write_yaml(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, write_yaml(tmp_path, "- a\n- b\n"))


def test_resolved_config_saved_beside_output_round_trips(tmp_path: Path) -> None:
    cfg = load_config(Outer, None, ["name=José Álvarez", "attack.eps=8/255", "pair=[5, 6]"])
    out = save_resolved(cfg, tmp_path / "run", "config.yaml")
    assert out == tmp_path / "run" / "config.yaml" and out.is_file()
    assert "José Álvarez" in out.read_text(encoding="utf-8")
    assert not list(out.parent.glob(".*.tmp"))
    again = load_config(Outer, out)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, lr=0.2)) != config_hash(cfg)
    # A plain mapping (e.g. a sweep row holding configs) hashes too, the same as the dataclass it spells out.
    assert config_hash({"cfg": cfg, "row": [1, 2]}) == config_hash({"cfg": dataclasses.asdict(cfg), "row": (1, 2)})
    assert config_hash(dataclasses.asdict(cfg)) == config_hash(cfg)


def test_shards_config_validation_names_field() -> None:
    with pytest.raises(ConfigError, match="max_per_identity"):
        from_dict(ShardsConfig, {"min_per_identity": 5, "max_per_identity": 2})
    with pytest.raises(ConfigError, match="test_fraction"):
        from_dict(ShardsConfig, {"test_fraction": 1.0})
    with pytest.raises(ConfigError, match="size"):
        from_dict(ShardsConfig, {"size": [4]})
    assert from_dict(ShardsConfig, {"size": [112, 96]}).target_size == (112, 96)
    assert from_dict(ShardsConfig, {"size": [64]}).target_size == (64, 64)


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_one_line_errors(tmp_path: Path) -> None:
    """Bad input is one line on stderr and exit code 2, never a traceback."""
    out = str(tmp_path / "o")
    cases = [
        ["shards", "build", "--src", str(tmp_path / "missing"), "--out", out],
        ["shards", "build", "--out", out],
        ["shards", "build", "--src", str(tmp_path), "--out", out, "--size", "big"],
        ["shards", "build", "--src", str(tmp_path), "--out", out, "sampels_per_shard=3"],
        ["shards", "build", "--src", str(tmp_path), "--out", out, "--test-fraction", "1.5"],
        ["shards", "build", "--src", str(tmp_path), "--out", out],  # an empty folder: no images
    ]
    # One interpreter per case would cost seconds each on a busy machine; run them all in one child process.
    script = (
        "import sys, json\n"
        "from segue_dist import cli\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        rc = cli.main(argv)\n"
        "    except SystemExit as exc:\n"
        "        rc = exc.code\n"
        "    print('RC', rc, file=sys.stderr)\n"
    )
    usage = ["shards", "bogus"]  # argparse's own usage error: also exit code 2
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps([*cases, usage])],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    usage_part = proc.stderr[proc.stderr.rindex("usage:") :]
    assert "invalid choice" in usage_part and usage_part.rstrip().endswith("RC 2")
    lines = [ln for ln in proc.stderr[: proc.stderr.rindex("usage:")].splitlines() if ln.strip()]
    pairs = list(zip(lines[0::2], lines[1::2], strict=True))
    assert len(pairs) == len(cases), proc.stderr
    for (message, rc), argv in zip(pairs, cases, strict=True):
        assert rc == "RC 2", (argv, message)
        assert message.startswith("segue shards: error: "), message
    assert "missing" in pairs[0][0] and "not found" in pairs[0][0]
    assert "--src" in pairs[1][0]
    assert "--size" in pairs[2][0]
    assert "sampels_per_shard" in pairs[3][0] and "samples_per_shard" in pairs[3][0]
    assert "test_fraction" in pairs[4][0]
    assert "no images" in pairs[5][0]


def test_cli_paths_that_look_like_yaml_stay_strings(tmp_path: Path) -> None:
    import argparse

    from segue_dist.shards import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for weird in ("yes", "null", "a: b", "#x", "[1]", "José/李 小龙"):
        args = parser.parse_args(["build", "--src", weird, "--out", str(tmp_path / weird), "--size", "112x96"])
        cfg = config_from_args(args)
        assert cfg.src == weird and cfg.out == str(tmp_path / weird)
        assert cfg.target_size == (112, 96)


def test_config_file_for_shards(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, yaml.safe_dump({"src": "a", "out": "b", "size": [40, 32], "test_fraction": "1/5"}))
    cfg = load_config(ShardsConfig, path, ["samples_per_shard=7"])
    assert cfg.target_size == (40, 32) and cfg.test_fraction == pytest.approx(0.2) and cfg.samples_per_shard == 7
