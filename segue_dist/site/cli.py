"""`segue site check|submit`: argument parsing and the two actions."""

from __future__ import annotations

import argparse
import sys

from segue_dist.site.checks import check_site
from segue_dist.site.commands import stage_args
from segue_dist.site.config import STAGES, load_site
from segue_dist.site.findings import Finding
from segue_dist.site.local import submit_local
from segue_dist.site.slurm import submit_slurm
from segue_dist.site.summary import print_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="validate a site file and show what each stage would run")
    check.add_argument("site", help="configs/sites/<site>.yaml")
    check.add_argument("--stage", choices=STAGES, action="append", help="check only this stage (repeatable)")
    check.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a site key"
    )
    submit = sub.add_parser(
        "submit",
        help="render launch/slurm/<stage>.sbatch from the site and sbatch it (local sites: run it here)",
        usage="segue site submit SITE STAGE [--dry-run] [--set KEY=VALUE ...] [--] [stage args ...]",
    )
    submit.add_argument("site", help="configs/sites/<site>.yaml")
    submit.add_argument("stage", choices=STAGES)
    submit.add_argument(
        "rest", nargs=argparse.REMAINDER, help="--dry-run / --set KEY=VALUE, then the stage's arguments"
    )


def split_submit_args(rest: list[str]) -> tuple[bool, list[str], list[str]]:
    """(--dry-run?, --set overrides, stage args): submit's own options come first, ``--`` or any other word ends them."""
    dry_run, overrides, i = False, [], 0
    while i < len(rest):
        item = rest[i]
        if item == "--dry-run":
            dry_run = True
        elif item == "--set" and i + 1 < len(rest):
            overrides.append(rest[i + 1])
            i += 1
        elif item.startswith("--set="):
            overrides.append(item.split("=", 1)[1])
        elif item == "--":
            return dry_run, overrides, rest[i + 1 :]
        else:
            break
        i += 1
    return dry_run, overrides, rest[i:]


def report_errors(findings: list[Finding]) -> bool:
    errors = [f for f in findings if f.level == "error"]
    for finding in errors:
        print(f"segue site: error: {finding.line()}", file=sys.stderr)
    return bool(errors)


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        site = load_site(args.site, args.overrides)
        stages = args.stage or list(STAGES)
        findings = check_site(site, stages)
        print_report(site, args.site, stages, findings)
        return 2 if report_errors(findings) else 0
    dry_run, overrides, user_args = split_submit_args(args.rest)
    site = load_site(args.site, overrides)
    findings = check_site(site, [args.stage])
    for finding in findings:
        if finding.level == "warning":
            print(f"segue site: warning: {finding.line()}", file=sys.stderr)
    if report_errors(findings):
        return 2
    stage_argv = stage_args(site, args.stage, user_args)
    if site.scheduler == "slurm":
        return submit_slurm(site, args.site, args.stage, stage_argv, dry_run)
    return submit_local(site, args.stage, stage_argv, dry_run)
