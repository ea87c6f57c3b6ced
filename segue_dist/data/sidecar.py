"""Pseudo-label sidecars: key -> cluster id for a shard set, read by training and protect in place of `.cls`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segue_dist.utils.io import atomic_write_json, read_json

SIDECAR_VERSION = 1


def write_sidecar(
    path: str | Path,
    labels: dict[str, int],
    k: int,
    *,
    feature_model_sha256: str = "",
    extra: dict[str, Any] | None = None,
) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sizes = [0] * k
    for label in labels.values():
        if not 0 <= label < k:
            raise ValueError(f"pseudo-label {label} outside 0..{k - 1}")
        sizes[label] += 1
    atomic_write_json(
        path,
        {
            "version": SIDECAR_VERSION,
            "k": k,
            "num_samples": len(labels),
            "sizes": sizes,
            "feature_model_sha256": feature_model_sha256,
            **(extra or {}),
            "labels": dict(sorted(labels.items())),
        },
    )


def read_sidecar(path: str | Path) -> tuple[dict[str, int], int]:
    """Return (key -> label, K); a malformed file is a one-line error naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "pseudo_labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label sidecar not found: {path}")
    data = read_json(path)
    if not isinstance(data, dict) or "labels" not in data or "k" not in data:
        raise ValueError(f"{path}: not a pseudo-label sidecar (needs 'k' and 'labels')")
    if not isinstance(data["labels"], dict):
        raise ValueError(f"{path}: 'labels' must map sample keys to integers")
    try:
        k = int(data["k"])
        labels = {str(key): _as_label(v) for key, v in data["labels"].items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if k < 1:
        raise ValueError(f"{path}: k must be >= 1, got {k}")
    bad = next((key for key, v in labels.items() if not 0 <= v < k), None)
    if bad is not None:
        raise ValueError(f"{path}: label of {bad} outside 0..{k - 1}")
    return labels, k


def _as_label(value: object) -> int:
    # JSON may hold 3 or "3"; 3.5 or true is a broken file, not a label.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"label {value!r} is not an integer")
    return int(value)
