"""The one shard writer: a WebDataset tar written atomically, then its ``NNNNN._stats.json``.

Used by `segue shards build`, `segue protect` and `segue evaluate baseline`. Every shard set of the project is
laid out the same way on disk (``docs/DESIGN.md``, Files):

* the tar is written under a temporary name (``utils.io.atomic_open``: ``.NNNNN.tar.XXXX.tmp`` beside it), fsynced,
  renamed into place and the directory fsynced;
* its stats (``NNNNN._stats.json``) are written after the rename: their presence marks the shard finished, so a
  rerun skips finished shards and redoes the rest;
* tar members are ``<key>.<field>`` with fields in sorted order, mode 0444, owner ``bigdata`` and a fixed mtime
  (:data:`TAR_MTIME`), so identical inputs give byte-identical shards whenever they are written.

Plain ``tarfile``, not ``webdataset.TarWriter``: importing webdataset imports torch, which the shard builder does
not need. ``PAX`` output is byte for byte what ``webdataset.TarWriter(mtime=0.0, encoder=False)`` writes (it opens
its tar with tarfile's default format, and a float mtime makes tarfile add a PAX ``mtime`` record per member).
"""

from __future__ import annotations

import contextlib
import io
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from segue_dist.utils.io import atomic_open, atomic_write_json

# Fixed tar member mtime: identical inputs must give byte-identical shards, whenever they are built.
TAR_MTIME = 0.0
# The per-shard stats file; written last, its presence marks the shard finished.
STATS_SUFFIX = "._stats.json"
# A shard set's own files: NNNNN.tar and NNNNN._stats.json (five digits or more).
SHARD_FILE = re.compile(r"^\d{5,}\.tar$|^\d{5,}" + re.escape(STATS_SUFFIX) + "$")
# Tar header formats. Shard builds have always been USTAR; protect and baseline output were PAX (webdataset's
# TarWriter) and stay so, so that a resumed run and an older one write the same bytes.
USTAR = tarfile.USTAR_FORMAT
PAX = tarfile.PAX_FORMAT
_OWNER = "bigdata"  # webdataset's default member owner and group


def stats_path(tar_path: str | Path) -> Path:
    """``.../NNNNN.tar`` -> ``.../NNNNN._stats.json``."""
    tar_path = Path(tar_path)
    stem = tar_path.name[: -len(".tar")] if tar_path.name.endswith(".tar") else tar_path.name
    return tar_path.with_name(stem + STATS_SUFFIX)


def shard_is_finished(tar_path: str | Path) -> bool:
    """Tar and stats both on disk (the stats are written last, after the tar's rename)."""
    return Path(tar_path).is_file() and stats_path(tar_path).is_file()


def remove_shard_temps(tar_path: str | Path) -> int:
    """Delete the temporaries a killed writer left for this shard (tar and stats), and only this shard's: other
    ranks may be writing their own shards' temporaries in the same folder right now. Returns how many."""
    tar_path = Path(tar_path)
    removed = 0
    for pattern in (f".{tar_path.name}.*.tmp", f".{stats_path(tar_path).name}.*.tmp"):
        for tmp in tar_path.parent.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


class TarSampleWriter:
    """WebDataset samples into an open binary file: ``sample["__key__"]`` names the sample, every other field not
    starting with ``_`` becomes member ``<key>.<field>`` (bytes, or str stored as UTF-8), fields sorted."""

    def __init__(self, fileobj: IO[bytes], tar_format: int = USTAR) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tar_format)  # noqa: SIM115 - closed by close()

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for field_name in sorted(k for k in sample if not k.startswith("_")):
            data = sample[field_name]
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{field_name}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname = info.gname = _OWNER
            self.tar.addfile(info, io.BytesIO(data))
        # tarfile keeps every TarInfo it writes (for getmembers); a writer that lives for a whole shard would hold
        # O(samples) headers, and protect's memory would grow with the corpus. Nothing here reads them back.
        self.tar.members.clear()

    def close(self) -> None:
        self.tar.close()


class ShardFile:
    """One shard on its way to disk: :meth:`write` samples, then :meth:`finish` (rename + stats) or :meth:`abort`.

    Long-lived on purpose (protect keeps one open per shard across many batches), so the ``atomic_open`` context is
    held in an ``ExitStack`` instead of a ``with`` block. Not thread-safe: one thread writes a shard.
    """

    def __init__(self, tar_path: str | Path, tar_format: int = USTAR) -> None:
        self.path = Path(tar_path)
        self._stack = contextlib.ExitStack()
        self._fh = self._stack.enter_context(atomic_open(self.path, "wb"))
        self._tar = TarSampleWriter(self._fh, tar_format)
        self.closed = False

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)

    def finish(self, stats: dict[str, Any]) -> None:
        """Close the tar, fsync, rename it into place (and fsync the folder), then write ``stats`` beside it."""
        self._tar.close()
        self.closed = True
        self._stack.close()  # atomic_open's commit: fsync, rename, directory fsync
        atomic_write_json(stats_path(self.path), stats)

    def abort(self) -> None:
        """Drop the temporary file; the shard stays unfinished (a rerun redoes it). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._stack.__exit__(RuntimeError, RuntimeError("shard aborted"), None)


def write_shard(
    tar_path: str | Path, samples: Iterable[dict[str, Any]], stats: dict[str, Any], tar_format: int
) -> None:
    """Write a whole shard (samples consumed one at a time) and then its stats."""
    shard = ShardFile(tar_path, tar_format)
    try:
        for sample in samples:
            shard.write(sample)
    except BaseException:
        shard.abort()
        raise
    shard.finish(stats)
