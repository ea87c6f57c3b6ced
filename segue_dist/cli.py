"""`segue <verb>`: one sub-command per pipeline stage, each implemented by the module of the same name."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from segue_dist.config import ConfigError

# verb -> module; modules are imported only when their verb runs so `segue --help` stays instant.
VERBS = {
    "shards": ("segue_dist.shards", "build WebDataset shards from identity folders or tars"),
    "cluster": ("segue_dist.cluster", "pseudo-labels: face features + K-means + quality report"),
    "train": ("segue_dist.train", "train the Segue generator (Algorithm 1); use accelerate launch for several GPUs"),
    "protect": ("segue_dist.protect", "perturb a shard set with a trained generator"),
    "evaluate": ("segue_dist.evaluate", "attacker harness: train victims on protected data, test on clean"),
    "report": ("segue_dist.report", "Markdown + HTML report from evaluation results"),
    "site": ("segue_dist.site", "validate a cluster site file and show what would run"),
    "demo": ("segue_dist.demo", "the whole path on the embedded synthetic corpus"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segue", description="Segue unlearnable-example protection at scale")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module_name)
        if verb in sys.argv[1:2]:  # only the chosen verb's module is imported to add its arguments
            importlib.import_module(module_name).add_arguments(verb_parser)
    return parser


def run_verb(verb: str, module: Any, args: argparse.Namespace) -> int:
    """Run a stage; bad input becomes one line naming what is wrong and exit code 2, not a traceback."""
    try:
        return int(module.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"segue {verb}: error: {exc}", file=sys.stderr)
        return 2


def stage_main(verb: str, argv: Sequence[str] | None = None) -> int:
    """`python -m segue_dist.<stage>` (what torchrun / accelerate launch start): the flags and errors of `segue <verb>`."""
    module_name, help_text = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"segue {verb}", description=help_text)
    module.add_arguments(parser)
    return run_verb(verb, module, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_verb(args.verb, importlib.import_module(args._module), args)


if __name__ == "__main__":
    sys.exit(main())
