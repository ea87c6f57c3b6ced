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
    k = int(data["k"])
    labels = {str(key): int(v) for key, v in data["labels"].items()}
    bad = next((key for key, v in labels.items() if not 0 <= v < k), None)
    if bad is not None:
        raise ValueError(f"{path}: label of {bad} outside 0..{k - 1}")
    return labels, k
