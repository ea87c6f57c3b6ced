"""What a protect run's output depends on: the settings recorded in ``_protect.json`` (checked on resume) and where
G's side information (labels) comes from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segue_dist.checkpoint import file_sha256, label_map_hash
from segue_dist.data.loader import ShardSet
from segue_dist.data.sidecar import read_sidecar
from segue_dist.protect.options import ProtectOptions
from segue_dist.protect.quantise import eps_levels
from segue_dist.utils.io import atomic_write_json, read_json

SETTINGS_NAME = "_protect.json"


def protect_settings(
    opts: ProtectOptions, gen_meta: dict[str, Any], generator_sha: str, eps: float, compute: str, batch_size: int
) -> dict[str, Any]:
    """What the output bytes depend on; recorded in `_protect.json` and checked when a run resumes."""
    spec = {"png_level": opts.png_level} if opts.format == "png" else {"jpeg_quality": opts.jpeg_quality}
    labels = "cls" if opts.labels is None else f"sidecar:{file_sha256(_sidecar_file(opts.labels))}"
    return {
        "generator_sha256": generator_sha,
        "eps": eps,
        "eps_levels": eps_levels(eps),
        "format": opts.format,
        **spec,
        "labels": labels,
        "compute": compute,
        # On CPU every image goes through G alone, so the batch size cannot change a byte.
        "batch_size": batch_size if compute.startswith("cuda") else None,
        "generator_num_classes": int(gen_meta.get("num_classes", 0)),
    }


# Keys whose change would make one output set mix two different protections: a resume refuses them.
SETTINGS_MUST_MATCH = ("generator_sha256", "eps", "format", "png_level", "jpeg_quality", "labels", "metadata")
# Keys whose change keeps the protection valid but may flip the odd uint8 rounding: a resume warns.
SETTINGS_SHOULD_MATCH = ("compute", "batch_size")


def check_or_record_settings(out_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Record the settings on a first run; on a resume, refuse incompatible ones. Returns warnings."""
    path = out_dir / SETTINGS_NAME
    if not path.is_file():
        if any(out_dir.glob("*.tar")):
            raise ValueError(f"{out_dir} holds .tar shards not written by segue protect; choose an empty --out")
        atomic_write_json(path, settings)  # every rank writes the same content: the race is harmless
        return []
    previous = read_json(path)
    for key in SETTINGS_MUST_MATCH:
        if previous.get(key) != settings.get(key):
            raise ValueError(
                f"{out_dir} was started with {key}={previous.get(key)!r}, this run has {settings.get(key)!r}; "
                f"resume with the same settings or choose a new --out"
            )
    return [
        f"{key} differs from the run that started {out_dir} ({previous.get(key)!r} -> {settings.get(key)!r}): "
        f"shards written now may differ in the odd uint8 rounding from an uninterrupted run"
        for key in SETTINGS_SHOULD_MATCH
        if previous.get(key) != settings.get(key)
    ]


def _sidecar_file(path: str) -> Path:
    p = Path(path)
    return p / "pseudo_labels.json" if p.is_dir() else p


@dataclass
class LabelPlan:
    label_map: dict[str, int] | None  # None = use `.cls`
    limit: int  # labels must be in [0, limit)
    warnings: list[str] = field(default_factory=list)


def plan_labels(opts: ProtectOptions, shard_set: ShardSet, gen_meta: dict[str, Any], gen_cfg: Any) -> LabelPlan:
    """Where G's side information comes from, and a clear error if the generator cannot code those labels."""
    num_classes, bits = int(gen_cfg.num_classes), int(gen_cfg.bits)
    limit = 2**bits if opts.allow_unseen_labels else num_classes
    hint = "" if opts.allow_unseen_labels else f" (--allow-unseen-labels accepts labels up to {2**bits - 1})"
    warnings_: list[str] = []
    if opts.labels is not None:
        label_map, k = read_sidecar(opts.labels)
        if k > limit:
            raise ValueError(f"sidecar {opts.labels} has K={k} pseudo-labels but the generator codes {limit}{hint}")
        return LabelPlan(label_map, limit, warnings_)
    if shard_set.labels:
        top = max(shard_set.labels.values())
        if top >= limit:
            raise ValueError(
                f"{shard_set.root}/labels.json has labels up to {top} but the generator codes only {limit}{hint}"
            )
        trained_hash = gen_meta.get("label_map_sha256", "")
        if (
            trained_hash
            and gen_meta.get("label_source", "cls") == "cls"
            and trained_hash != label_map_hash(shard_set.labels)
        ):
            warnings_.append(
                "the generator was trained with a different label map than this shard set's labels.json: labels "
                "just index codes, so this works, but identity i gets the code identity i had in training"
            )
    return LabelPlan(None, limit, warnings_)
