"""Image quality of a protected split against its clean split, paired by key (Table III metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segue_dist.data.loader import OnePassStream, Record, ShardSet, one_pass_loader, open_shard_set


def _index_keys(shard_set: ShardSet, workers: int) -> dict[str, str]:
    """key -> shard path, from a pass that reads but does not decode."""
    index: dict[str, str] = {}
    for record in one_pass_loader(OnePassStream(list(shard_set.shards), decode=False), workers):
        if isinstance(record, Record) and record.error is None:
            index[record.key] = record.shard
    return index


def _decode_shard(shard: str, wanted: set[str] | None = None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for record in OnePassStream([shard]):
        if isinstance(record, Record) and record.image is not None and (wanted is None or record.key in wanted):
            out[record.key] = record.image
    return out


def iter_pairs(
    clean_dir: str, protected_dir: str, workers: int = 2
) -> Iterator[tuple[str, Tensor, Tensor] | tuple[str, None, None]]:
    """(key, clean uint8, protected uint8) for every protected sample, paired by key; (key, None, None) if unpaired.

    Memory stays at about two shards: protected shards are read one at a time and only the clean shards holding
    their keys are decoded (a protect output keeps the shard layout, so that is usually the same-named one).
    """
    clean_index = _index_keys(open_shard_set(clean_dir), workers)
    for shard in open_shard_set(protected_dir).shards:
        protected = _decode_shard(shard)
        by_clean_shard: dict[str, set[str]] = {}
        for key in protected:
            if key in clean_index:
                by_clean_shard.setdefault(clean_index[key], set()).add(key)
        clean: dict[str, Tensor] = {}
        for clean_shard, keys in sorted(by_clean_shard.items()):
            clean.update(_decode_shard(clean_shard, keys))
        for key in sorted(protected):
            if key in clean:
                yield key, clean[key], protected[key]
            else:
                yield key, None, None


def resized_like(clean: Tensor, protected: Tensor) -> Tensor:
    """The clean uint8 image at the protected image's size, resized as the loaders do (short side, centre crop): the
    very image a baseline generated at another size (`segue evaluate sweep` makes them at the victims' size) started
    from, so the metrics measure the perturbation, not the resize."""
    from PIL import Image

    from segue_dist.data.images import pil_to_uint8, resize_center_crop

    img = Image.fromarray(clean.permute(1, 2, 0).numpy())
    return pil_to_uint8(resize_center_crop(img, (int(protected.shape[-2]), int(protected.shape[-1]))))


def image_quality_between(
    clean_dir: str,
    protected_dir: str,
    *,
    lpips_model: nn.Module | None = None,
    batch_size: int = 64,
    device: torch.device | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Table III metrics over every key pair: means of PSNR (capped), SSIM, MS-SSIM (>= 161 px), LPIPS, MAE, RMSE;
    L∞ as max and mean (in [0, 1] units and in 8-bit steps). A clean image of another size than its protected
    counterpart is first resized to it (`resized_like`; counted, and noted)."""
    from segue_dist.metrics.image_quality import MS_SSIM_MIN_SIDE, PSNR_CAP_DB, image_quality_per_image

    device = device or torch.device("cpu")
    sums: dict[str, list[float]] = {}
    pending: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}
    counts = {"pairs": 0, "unpaired": 0, "resized": 0}
    small = 0
    lpips_skipped = [0]

    def flush(shape: tuple[int, ...]) -> None:
        pairs = pending.pop(shape, [])
        if not pairs:
            return
        x = torch.stack([c for c, _ in pairs]).to(device).float().div_(255)
        y = torch.stack([p for _, p in pairs]).to(device).float().div_(255)
        # LPIPS's backbone needs a minimum side (AlexNet: 32 px at least); smaller images are left out of its mean.
        fits = lpips_model is not None and min(shape[-2:]) >= getattr(lpips_model, "min_side", 0)
        lpips_skipped[0] += 0 if fits or lpips_model is None else len(pairs)
        for name, values in image_quality_per_image(x, y, lpips_model if fits else None).items():
            if name == "psnr":
                values = values.clamp(max=PSNR_CAP_DB)
            sums.setdefault(name, []).extend(values.tolist())

    for _key, clean, protected in iter_pairs(clean_dir, protected_dir, workers):
        if clean is None or protected is None:
            counts["unpaired"] += 1
            continue
        if clean.shape != protected.shape:
            clean = resized_like(clean, protected)
            counts["resized"] += 1
        counts["pairs"] += 1
        small += min(clean.shape[-2:]) < MS_SSIM_MIN_SIDE
        pending.setdefault(tuple(clean.shape), []).append((clean, protected))
        if len(pending[tuple(clean.shape)]) >= batch_size:
            flush(tuple(clean.shape))
    for shape in list(pending):
        flush(shape)
    if not counts["pairs"]:
        raise ValueError(f"no sample of {protected_dir} has a counterpart (by key) in {clean_dir}")
    metrics = {name: float(np.mean(v)) for name, v in sums.items() if name != "linf"}
    linf = np.asarray(sums["linf"])
    metrics.update(linf=float(linf.max()), linf_mean=float(linf.mean()), linf_255=round(float(linf.max()) * 255, 3))
    notes = {}
    if "ms_ssim" not in metrics:
        notes["ms_ssim"] = f"skipped: images smaller than {MS_SSIM_MIN_SIDE} px"
    elif small:
        notes["ms_ssim"] = f"over the {counts['pairs'] - small} images of at least {MS_SSIM_MIN_SIDE} px"
    if counts["resized"]:
        notes["size"] = (
            f"{counts['resized']} clean images resized to their protected image's size as the loaders resize "
            "(a baseline is made at the victims' size, e.g. 32 px from 64 px shards)"
        )
    if lpips_skipped[0]:
        notes["lpips"] = f"{lpips_skipped[0]} images below LPIPS's minimum side left out"
    return {"metrics": metrics, "counts": counts, "notes": notes, "ms_ssim_images": counts["pairs"] - small}


def load_lpips(weights: str, lin: str = "") -> tuple[nn.Module | None, str]:
    """LPIPS from local files only, with a note on its variant; (None, why) when no weights are given."""
    from segue_dist.metrics.image_quality import LPIPS, lpips_available

    if not weights:
        return None, "skipped: no local LPIPS weights (pass --lpips-weights PATH to an AlexNet ImageNet state dict)"
    ok, reason = lpips_available(weights, lin or None)
    if not ok:  # weights were asked for: a wrong path is an error, not a silently missing column
        raise FileNotFoundError(reason)
    return LPIPS.from_local(weights, lin or None), reason


def run_quality(
    clean_dir: str,
    protected_dir: str,
    *,
    lpips_weights: str = "",
    lpips_lin: str = "",
    device: torch.device | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    device = device or torch.device("cpu")
    model, lpips_note = load_lpips(lpips_weights, lpips_lin)
    if model is not None:
        model = model.to(device)
    result = image_quality_between(clean_dir, protected_dir, lpips_model=model, device=device, workers=workers)
    result["notes"]["lpips"] = "; ".join(n for n in (lpips_note, result["notes"].get("lpips", "")) if n)
    return {"kind": "quality", "clean": clean_dir, "protected": protected_dir, **result}
