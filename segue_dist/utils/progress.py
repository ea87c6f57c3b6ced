"""Rich progress bars and summary tables, shown by rank 0 only."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

console = Console()


class _Progress(Progress):
    """Progress whose tasks always carry an ``info`` field (free text beside the bar: loss, throughput)."""

    def add_task(self, description: str, *args, **kwargs):  # type: ignore[override]
        kwargs.setdefault("info", "")
        return super().add_task(description, *args, **kwargs)


def _is_main() -> bool:
    """Rank 0 (or no launcher), without importing torch for stages that never use it."""
    if "torch.distributed" in sys.modules:
        from segue_dist.utils.dist import is_main

        return is_main()
    return os.environ.get("RANK", "0") == "0"


def make_progress(disable: bool = False) -> Progress:
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable or not _is_main(),
        transient=False,
    )


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], path: str = "") -> None:
    """A table under ``title``. ``path`` (a file or folder the table is about) goes after the title on a line of its
    own above the table, not into the title: rich wraps a title to the table's width, which breaks a long path
    mid-name ("…/protected/trai" / "n"). That line is never wrapped by rich (a narrower terminal folds it itself)."""
    if not _is_main():
        return
    table = Table(title=None if path else title)
    for col in columns:
        table.add_column(col, justify="right" if col not in (columns[0],) else "left")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    if path:
        console.print(Text.assemble((f"{title}: ", "bold"), path), soft_wrap=True)
    console.print(table)
