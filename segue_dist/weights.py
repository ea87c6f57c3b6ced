"""Weights and state on disk as safetensors + JSON: the exported generator (`export_generator`, `load_generator`),
strict loading, hashes, and the state-file helpers (RNG, optimiser state) that exact resume
(`segue_dist/training/resume.py`) writes its checkpoints with.

Everything a user loads is safetensors + JSON, never pickle, and loading is strict: a missing or unexpected key
or a shape mismatch is an error that names it (the authors' code silently skipped mismatches, which turns a wrong
checkpoint into silently useless protection).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from segue_dist.utils.io import atomic_write_json, read_json

GENERATOR_FORMAT = "segue-generator/1"


class CheckpointError(ValueError):
    """A checkpoint does not match what loads it; the message says what differs."""


def label_map_hash(label_map: dict[str, int] | None) -> str:
    if not label_map:
        return ""
    blob = json.dumps(sorted(label_map.items()), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    # safetensors writes by path: write a temporary sibling, then rename it into place.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.writing.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with shape mismatches reported as one clear line, not a traceback."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: keys differ (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{what}: shape mismatch at {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------- exported generator


def export_generator(
    generator: nn.Module,
    out_dir: str | Path,
    *,
    label_map: dict[str, int] | None,
    label_source: str,
    train_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `generator.safetensors` and `generator.json` into ``out_dir``; returns the safetensors path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "generator.safetensors"
    config = dataclasses.asdict(generator.config)  # type: ignore[arg-type]
    save_safetensors(generator.state_dict(), weights, metadata={"format": GENERATOR_FORMAT})
    meta = {
        "format": GENERATOR_FORMAT,
        "architecture": "SegueGenerator",
        "generator": config,
        "eps": config["eps"],
        "bits": config["bits"],
        "num_classes": config["num_classes"],
        "label_source": label_source,
        "label_map_sha256": label_map_hash(label_map),
        "label_map": label_map or {},
        "weights_sha256": file_sha256(weights),
        "train_config": train_config or {},
        **(extra or {}),
    }
    atomic_write_json(out_dir / "generator.json", meta)
    return weights


def generator_weights_path(path: str | Path) -> Path:
    """The exported generator's .safetensors file: ``path`` itself, or ``generator.safetensors`` in that folder."""
    path = Path(path)
    return path / "generator.safetensors" if path.is_dir() else path


def generator_sha256(path: str | Path, meta: dict[str, Any]) -> str:
    """The weights' SHA-256: recorded in the export's JSON (checked by :func:`load_generator`), else hashed."""
    return meta.get("weights_sha256") or file_sha256(generator_weights_path(path))


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported generator strictly, in eval mode. ``path`` is the .safetensors file or its folder."""
    from segue_dist.config import from_dict
    from segue_dist.models.generator import GeneratorConfig, SegueGenerator

    weights = generator_weights_path(path)
    meta_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise FileNotFoundError(f"generator weights not found: {weights}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"generator metadata not found: {meta_path} (export writes it beside the weights)")
    meta = read_json(meta_path)
    if meta.get("format") != GENERATOR_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {GENERATOR_FORMAT!r}")
    if meta.get("weights_sha256") and meta["weights_sha256"] != file_sha256(weights):
        raise CheckpointError(f"{weights}: checksum differs from {meta_path.name} (file changed or corrupt)")
    generator = SegueGenerator(from_dict(GeneratorConfig, meta["generator"]))
    load_state_strict(generator, load_file(str(weights)), str(weights))
    return generator.to(device).eval(), meta


# --------------------------------------------------------------------------------------------- training state


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def rng_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states as tensors (safetensors) plus JSON-able parts; no pickle."""
    py_version, py_state, py_gauss = state["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    tensors = {
        "rng.python": torch.tensor(py_state, dtype=torch.int64),
        "rng.numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "rng.torch": state["torch"],
    }
    for i, s in enumerate(state["cuda"]):
        tensors[f"rng.cuda.{i}"] = s
    meta = {"python": [py_version, py_gauss], "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    py_version, py_gauss = meta["python"]
    random.setstate((py_version, tuple(int(v) for v in tensors["rng.python"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["rng.numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def flatten_state(prefix: str, state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Split a nested state (optimizer/scheduler state_dict) into tensors and a JSON skeleton referencing them."""
    if isinstance(state, torch.Tensor):
        name = f"{prefix}"
        tensors[name] = state.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(state, dict):
        return {"__dict__": [[_key(k), flatten_state(f"{prefix}.{k}", v, tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        kind = "__list__" if isinstance(state, list) else "__tuple__"
        return {kind: [flatten_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(state)]}
    if isinstance(state, (int, float, str, bool)) or state is None:
        return state
    raise CheckpointError(f"cannot store {type(state).__name__} at {prefix} without pickle")


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) else k


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {
                (k["__int__"] if isinstance(k, dict) else k): unflatten_state(v, tensors)
                for k, v in skeleton["__dict__"]
            }
        if "__list__" in skeleton:
            return [unflatten_state(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
    return skeleton


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A training-state checkpoint: `<path>.safetensors` + `<path>.json`, JSON written last (it marks completeness)."""
    path = Path(path)
    save_safetensors(tensors, path.with_suffix(".safetensors"))
    atomic_write_json(path.with_suffix(".json"), meta)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    meta_path, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"incomplete checkpoint at {path} (needs .json and .safetensors)")
    return load_file(str(weights)), read_json(meta_path)
