"""`segue report --results D --out R [--samples N]`."""

from __future__ import annotations

import argparse

from segue_dist.report.render import write_report
from segue_dist.utils.progress import console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="folder holding evaluation results (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for report.md, report.html and figures/")
    parser.add_argument("--samples", type=int, default=4, help="samples in each picture grid")


def run(args: argparse.Namespace) -> int:
    md_path, html_path = write_report(args.results, args.out, args.samples)
    console.print(f"[bold]report[/]: {md_path} and {html_path}")
    return 0
