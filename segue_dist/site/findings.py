"""One problem `segue site check` found: an error (exit 2) or a warning, tied to a site-file key or a path."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning
    where: str  # the site-file key or the path it is about
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.message}"
