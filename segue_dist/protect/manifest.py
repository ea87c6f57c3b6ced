"""Every shard is finished: the set's ``sizes.json``, ``_quarantine.jsonl`` and (last) ``_manifest.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segue_dist.data.loader import ShardSet
from segue_dist.data.shard_writer import shard_is_finished, stats_path
from segue_dist.utils.io import atomic_write_json, atomic_write_text, read_json

MANIFEST_NAME = "_manifest.json"
QUARANTINE_NAME = "_quarantine.jsonl"


def collect_finished(in_set: ShardSet, out_dir: Path) -> list[dict[str, Any]] | None:
    """Every input shard's output stats, or None while some shard is not finished yet."""
    names = [Path(s).name for s in in_set.shards]
    if not all(shard_is_finished(out_dir / name) for name in names):
        return None
    return [read_json(stats_path(out_dir / name)) for name in names]


def build_manifest(in_set: ShardSet, out_dir: Path, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over all shards and the balance check; deterministic content, so any rank may (re)write it."""
    samples_in = sum(in_set.sizes[s["shard"]] for s in stats)
    samples_read = sum(s["read"] for s in stats)
    samples_out = sum(s["written"] for s in stats)
    quarantined = [{"shard": s["shard"], **q} for s in stats for q in s["quarantined_samples"]]
    shard_errors = [{"shard": s["shard"], "reason": e} for s in stats for e in s["shard_errors"]]
    problems = []
    if samples_in != samples_out + len(quarantined):
        problems.append(
            f"samples in ({samples_in}) != samples out ({samples_out}) + quarantined ({len(quarantined)}): "
            f"{samples_in - samples_out - len(quarantined)} samples unaccounted for"
        )
    for s in stats:
        if in_set.sizes[s["shard"]] != s["written"] + s["quarantined"]:
            problems.append(f"{s['shard']}: sizes.json says {in_set.sizes[s['shard']]}, read {s['read']}")
    written = [s for s in stats if s["written"]]
    n = max(samples_out, 1)
    first = stats[0] if stats else {}
    lossless = first.get("format") == "png"
    max_abs = max((s["max_abs_delta"] for s in written), default=0)
    return {
        "input": str(in_set.root),
        "output": str(out_dir),
        "generator_sha256": first.get("generator_sha256"),
        "eps": first.get("eps"),
        "eps_levels": first.get("eps_levels"),
        "format": first.get("format"),
        **({"png_level": first["png_level"]} if "png_level" in first else {}),
        **({"jpeg_quality": first["jpeg_quality"]} if "jpeg_quality" in first else {}),
        "shards": len(stats),
        "samples_in": samples_in,
        "samples_read": samples_read,
        "samples_out": samples_out,
        "quarantined": len(quarantined),
        "balanced": not problems,
        "problems": problems,
        "eps_bound_holds": all(s["eps_bound_holds"] for s in stats) if lossless else None,
        "measured_max_abs": max_abs,
        "max_abs_delta": max_abs,
        "mean_abs_delta": round(sum(s["mean_abs_delta"] * s["written"] for s in written) / n, 4),
        "psnr_mean": round(sum(s["psnr_mean"] * s["written"] for s in written) / n, 3),
        "quarantined_samples": quarantined,
        "shard_errors": shard_errors,
        "written_by_rank": {str(s["shard"]): s["rank"] for s in stats},
    }


def finalize_if_complete(in_set: ShardSet, out_dir: Path) -> dict[str, Any] | None:
    """If every shard is finished, write sizes.json, _quarantine.jsonl and (last) _manifest.json; else None.

    Every rank calls this after its own shards. Without collectives nobody knows who finishes last, but whoever
    does sees all stats; two ranks finishing together write identical files atomically, which is harmless.
    """
    stats = collect_finished(in_set, out_dir)
    if stats is None:
        return None
    manifest = build_manifest(in_set, out_dir, stats)
    atomic_write_json(out_dir / "sizes.json", {s["shard"]: s["written"] for s in stats})
    lines = [json.dumps(q, ensure_ascii=False, sort_keys=True) for q in manifest["quarantined_samples"]]
    atomic_write_text(out_dir / QUARANTINE_NAME, "".join(line + "\n" for line in lines))
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest
