"""The report's figures: the picture grid (the paper's Fig. 2) and the list of figures a report shows."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from segue_dist.data.loader import OnePassStream, Record, image_from_bytes, open_shard_set, read_sample_bytes
from segue_dist.report.jpeg_curve import jpeg_curves, jpeg_figure
from segue_dist.report.results import Results, pick_rows

RESIDUAL_GAIN = 30  # the paper's Fig. 2 magnification


@dataclass
class Figure:
    title: str
    name: str  # file name under figures/
    data: bytes
    mime: str  # image/png or image/svg+xml
    caption: str = ""


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def load_keys(split_dir: str | Path, keys: set[str]) -> dict[str, Tensor]:
    """Decode only the wanted samples of a split, stopping once all are found."""
    found: dict[str, Tensor] = {}
    for shard in open_shard_set(split_dir).shards:
        for record in OnePassStream([shard], decode=False, keep_raw=True):
            if isinstance(record, Record) and record.key in keys and record.raw is not None:
                data = read_sample_bytes(record.raw)
                if data:
                    found[record.key] = image_from_bytes(data)
        if len(found) == len(keys):
            break
    return found


def pick_keys(split_dir: str | Path, count: int) -> list[str]:
    """``count`` keys spread evenly over the first shard's sorted keys (keys start with the label: varied identities)."""
    shard = open_shard_set(split_dir).shards[0]
    keys = sorted(r.key for r in OnePassStream([shard], decode=False) if isinstance(r, Record) and r.error is None)
    if not keys:
        return []
    idx = np.linspace(0, len(keys) - 1, num=min(count, len(keys))).round().astype(int)
    return [keys[i] for i in sorted(set(idx.tolist()))]


def picture_grid(clean_dir: str, protected: dict[str, str], count: int = 4, cell: int = 112) -> Image.Image | None:
    """Fig. 2: per sample, the clean image, then each method's protected image and its residual |x' - x| x 30."""
    if not protected:
        return None
    keys = pick_keys(next(iter(protected.values())), count)
    clean = load_keys(clean_dir, set(keys))
    sets = {name: load_keys(path, set(keys)) for name, path in protected.items()}
    keys = [k for k in keys if k in clean and all(k in s and s[k].shape == clean[k].shape for s in sets.values())]
    if not keys:
        return None
    headers = ["clean"] + [h for name in protected for h in (name, f"residual x{RESIDUAL_GAIN}")]
    pad, head = 4, 22
    grid = Image.new("RGB", (len(headers) * (cell + pad) + pad, head + len(keys) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = label_font(13)
    for c, text in enumerate(headers):
        draw.text((pad + c * (cell + pad) + cell // 2, head // 2), text, fill="black", font=font, anchor="mm")
    for r, key in enumerate(keys):
        tiles = [clean[key]]
        for name in protected:
            p = sets[name][key]
            residual = ((p.int() - clean[key].int()).abs() * RESIDUAL_GAIN).clamp(0, 255).to(torch.uint8)
            tiles += [p, residual]
        for c, tile in enumerate(tiles):
            image = Image.fromarray(tile.permute(1, 2, 0).numpy(), "RGB")
            # Nearest upscaling shows the perturbation's pixels as they are; no smoothing.
            image = image.resize(fit_into(image.size, cell), Image.Resampling.NEAREST)
            grid.paste(image, (pad + c * (cell + pad), head + pad + r * (cell + pad)))
    return grid


def fit_into(size: tuple[int, int], cell: int) -> tuple[int, int]:
    w, h = size
    scale = cell / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_figures(results: Results, datasets: list[str], samples: int) -> list[Figure]:
    figures = []
    for sweep in results.sweeps:
        data = sweep.get("data", {})
        protected = {
            name: m["train"]
            for name, m in sweep.get("methods", {}).items()
            if name != "clean" and Path(m["train"], "sizes.json").is_file()
        }
        clean = data.get("clean_train", "")
        if not protected or not Path(clean, "sizes.json").is_file():
            continue
        grid = picture_grid(clean, protected, samples)
        if grid is not None:
            name = f"grid_{sweep['name']}.png"
            caption = f"Clean, protected and residual |x' − x| × {RESIDUAL_GAIN} ({data.get('dataset', '')}, training images)."
            figures.append(Figure(f"Protected examples — {sweep['name']}", name, png_bytes(grid), "image/png", caption))
    for dataset in datasets:
        curves = jpeg_curves(results.victims, dataset)
        if not curves:
            continue
        rows = pick_rows(results.victims, dataset=dataset)
        data, mime = jpeg_figure(curves, rows[0]["chance"], f"Robustness to JPEG compression ({dataset})")
        ext = "png" if mime == "image/png" else "svg"
        figures.append(
            Figure(
                f"JPEG quality curve — {dataset}",
                f"jpeg_{dataset}.{ext}",
                data,
                mime,
                "Lower is better; dashed: chance.",
            )
        )
    return figures
