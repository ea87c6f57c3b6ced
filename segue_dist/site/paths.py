"""A site's ``paths.*`` entries as this machine (or the job) sees them: ``$VAR``/``~`` expansion, workdir fallback."""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

from segue_dist.site.config import REPO, SiteConfig

VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(text: str) -> str:
    """``~`` and ``$VAR``/``${VAR}`` from this environment (``$USER`` even where only the passwd entry has it).

    Paths are expanded where `segue site` runs, not on the nodes: ``#SBATCH --output`` would take a ``$VAR``
    literally. An unset variable stays as written; `check_paths` reports it.
    """
    env = {**os.environ}
    env.setdefault("USER", getpass.getuser())
    return VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), os.path.expanduser(text))


def site_path(site: SiteConfig, name: str) -> Path:
    """A ``paths.<name>`` entry, expanded, relative paths taken from the workdir."""
    workdir = Path(expand(site.paths.workdir))
    if name == "workdir":
        return workdir
    path = Path(expand(getattr(site.paths, name)))
    return path if path.is_absolute() else workdir / path


def in_workdir(site: SiteConfig, relative: str) -> Path:
    """A repo-relative file (an Accelerate or DeepSpeed config) as the job will see it.

    Off the cluster the site's workdir usually does not exist here; this checkout stands in for it then, so the
    configs you are about to deploy are still checked.
    """
    path = Path(expand(relative))
    if path.is_absolute():
        return path
    workdir = site_path(site, "workdir")
    return (workdir if workdir.is_dir() else REPO) / path


def train_split(site: SiteConfig) -> Path:
    return site_path(site, "shards") / "train"
