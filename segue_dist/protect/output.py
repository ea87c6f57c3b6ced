"""One protected output shard: the samples written, what was quarantined and why, and the shard's stats.

The bytes go through the project's one shard writer (:mod:`segue_dist.data.shard_writer`: temporary name, rename,
stats last, fixed mtime); this module adds what protect records per shard (ε checks, PSNR, quarantine reasons).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from segue_dist.data.shard_writer import PAX, ShardFile
from segue_dist.protect.codecs import ImageCheck
from segue_dist.protect.stream import SHARD_ERROR_SUFFIX, Item


class ShardWriter:
    """One output shard: samples appended by the tar-writer thread, then :meth:`finish` (rename, then stats)."""

    def __init__(self, out_dir: Path, name: str, expected: int, context: dict[str, Any]) -> None:
        self.out_dir, self.name, self.expected = out_dir, name, expected
        self.context = context  # settings and rank, copied into the stats
        self.started = time.perf_counter()
        self.read = 0
        self.written = 0
        self.quarantined: list[dict[str, str]] = []
        self.shard_errors: list[str] = []
        self.max_abs = 0
        self.sum_mean_abs = 0.0
        self.sum_psnr = 0.0
        # PAX: the tar format protect has always written (webdataset's TarWriter), so resumed output matches.
        self.file = ShardFile(out_dir / name, PAX)

    def quarantine(self, key: str, reason: str) -> int:
        """Record a sample that is not written; returns the number of samples it accounts for (0 for a tar fault)."""
        if key.endswith(SHARD_ERROR_SUFFIX):
            self.shard_errors.append(reason)  # a tar fault, not a sample: the balance check catches what it lost
            return 0
        self.read += 1
        self.quarantined.append({"key": key, "reason": reason})
        return 1

    def write(self, sample: dict[str, Any], check: ImageCheck) -> None:
        self.file.write(sample)
        self.read += 1
        self.written += 1
        self.max_abs = max(self.max_abs, check.max_abs)
        self.sum_mean_abs += check.mean_abs
        self.sum_psnr += check.psnr

    def finish(self) -> dict[str, Any]:
        """Close, fsync and rename the tar, then write the stats (last: they mark the shard finished)."""
        stats = self.stats()
        self.file.finish(stats)
        return stats

    def abort(self) -> None:
        self.file.abort()

    def stats(self) -> dict[str, Any]:
        n = max(self.written, 1)
        lossless = self.context["format"] == "png"
        return {
            "shard": self.name,
            **self.context,
            "expected": self.expected,
            "read": self.read,
            "written": self.written,
            "quarantined": len(self.quarantined),
            "quarantined_samples": self.quarantined,
            "shard_errors": self.shard_errors,
            "max_abs_delta": self.max_abs,
            "mean_abs_delta": round(self.sum_mean_abs / n, 4),
            "psnr_mean": round(self.sum_psnr / n, 3),
            "eps_bound_holds": (self.max_abs <= self.context["eps_levels"]) if lossless else None,
            "measured_max_abs": self.max_abs,
            "seconds": round(time.perf_counter() - self.started, 3),
        }


def output_sample(item: Item, data: bytes, ext: str, protected_info: dict[str, Any]) -> dict[str, Any]:
    """The sample written for a protected item: same key, `.cls` and other fields, new image, json + provenance."""
    meta = item.meta if isinstance(item.meta, dict) else {"meta": item.meta}
    meta = {**meta, "protected": {**protected_info, "label": int(item.label)}}
    sample: dict[str, Any] = {"__key__": item.key, **item.fields, ext: data}
    sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sample
