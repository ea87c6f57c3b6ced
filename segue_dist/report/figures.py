"""The report's figures: the picture grid (the paper's Fig. 2) and the list of figures a report shows.

The grid has one labelled row per kind (clean, protected, residual) and one column per sample; the residual is scaled
per image and symmetrically around mid-grey, because a fixed gain (the paper's x30) saturates at 8/255 and hides
the perturbation's structure and sign."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from segue_dist.data.loader import OnePassStream, Record, image_from_bytes, open_shard_set, read_sample_bytes
from segue_dist.report.jpeg_curve import jpeg_curves, jpeg_figure, no_attack_points
from segue_dist.report.results import Results, pick_rows

LABEL_WIDTH = 120  # the grid's left column, for the row labels
RESIDUAL_CAPTION = (
    "residual x' − x per image on a symmetric scale: mid-grey = 0, white / black = ± the largest |x' − x| of that "
    "image (a fixed gain would saturate)"
)


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


def residual_tile(protected: Tensor, clean: Tensor) -> Tensor:
    """(3, H, W) uint8 picture of x' − x: 0.5 + δ / (2·max|δ|) per image, so the sign and structure stay readable."""
    delta = protected.float() - clean.float()
    peak = float(delta.abs().max())
    scaled = 0.5 + delta / (2 * peak) if peak > 0 else torch.full_like(delta, 0.5)
    return (scaled * 255).round().clamp(0, 255).to(torch.uint8)


def grid_rows(protected: dict[str, str]) -> list[tuple[str, str]]:
    """(label, sub-label) per row: the clean image, then each method's protected image and its residual."""
    return [("clean", "")] + [row for name in protected for row in (("protected", name), ("residual", name))]


def draw_row_label(draw: ImageDraw.ImageDraw, y: int, cell: int, label: tuple[str, str]) -> None:
    font, middle = label_font(13), y + cell // 2
    x = LABEL_WIDTH - 8
    if label[1]:
        draw.text((x, middle - 8), label[0], fill="black", font=font, anchor="rm")
        draw.text((x, middle + 8), label[1], fill="dimgray", font=label_font(11), anchor="rm")
    else:
        draw.text((x, middle), label[0], fill="black", font=font, anchor="rm")


def picture_grid(clean_dir: str, protected: dict[str, str], count: int = 4, cell: int = 112) -> Image.Image | None:
    """Fig. 2 with one row per kind (clean; per method protected and residual) and one column per sample."""
    if not protected:
        return None
    keys = pick_keys(next(iter(protected.values())), count)
    clean = load_keys(clean_dir, set(keys))
    sets = {name: load_keys(path, set(keys)) for name, path in protected.items()}
    keys = [k for k in keys if k in clean and all(k in s and s[k].shape == clean[k].shape for s in sets.values())]
    if not keys:
        return None
    rows, pad = grid_rows(protected), 4
    grid = Image.new("RGB", (LABEL_WIDTH + len(keys) * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(rows):
        y = pad + r * (cell + pad)
        draw_row_label(draw, y, cell, label)
        for c, key in enumerate(keys):
            tile = grid_tile(label, clean[key], sets, key)
            image = Image.fromarray(tile.permute(1, 2, 0).numpy(), "RGB")
            # Nearest upscaling shows the perturbation's pixels as they are; no smoothing.
            image = image.resize(fit_into(image.size, cell), Image.Resampling.NEAREST)
            grid.paste(image, (LABEL_WIDTH + pad + c * (cell + pad), y))
    return grid


def grid_tile(label: tuple[str, str], clean: Tensor, sets: dict[str, dict[str, Tensor]], key: str) -> Tensor:
    kind, name = label
    if kind == "clean":
        return clean
    return sets[name][key] if kind == "protected" else residual_tile(sets[name][key], clean)


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
            caption = f"Rows: clean, protected, {RESIDUAL_CAPTION} ({data.get('dataset', '')}, training images)."
            figures.append(Figure(f"Protected examples — {sweep['name']}", name, png_bytes(grid), "image/png", caption))
    for dataset in datasets:
        curves = jpeg_curves(results.victims, dataset)
        if not curves:
            continue
        rows = pick_rows(results.victims, dataset=dataset)
        title = f"Robustness to JPEG compression ({dataset})"
        data, mime = jpeg_figure(curves, rows[0]["chance"], title, no_attack_points(results.victims, dataset))
        ext = "png" if mime == "image/png" else "svg"
        figures.append(
            Figure(
                f"JPEG quality curve — {dataset}",
                f"jpeg_{dataset}.{ext}",
                data,
                mime,
                "Lower is better; dashed: chance; the point at the right (none) is the same victim without JPEG.",
            )
        )
    return figures
