"""One photo in folder mode: decoded at its own size, mode and orientation, protected at the face scale, written
back in its own format, and checked against ε on the decoded bytes of what is written.

A photo is split into *planes*: the colour plane G perturbs (RGB, or one gray channel that gets a luminance δ),
the alpha plane (kept bit for bit) and, for 16-bit gray, the 16-bit samples (δ is added in whole 8-bit levels,
i.e. multiples of 257). Metadata (EXIF, ICC, XMP, text chunks) is never copied: the written file carries pixels only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segue_dist.data.images import BadImage, _upright, decode_image, to_rgb
from segue_dist.protect.codecs import EncodedImage, EncodeSpec, measure
from segue_dist.protect.compute import Perturber
from segue_dist.protect.options import MIN_SIDE
from segue_dist.protect.quantise import quantise_protected

# Formats written back as themselves, all losslessly except JPEG (PIL format names).
LOSSLESS_FORMATS = ("PNG", "WEBP", "BMP", "TIFF")
OUTPUT_FORMATS = ("JPEG", *LOSSLESS_FORMATS)
# ITU-R 601 luma, the weights PIL's convert("L") uses: a gray photo's δ is the luma of G's colour δ.
LUMA = (0.299, 0.587, 0.114)
# 16-bit samples per 8-bit level (65535 / 255): a δ of k levels moves a 16-bit sample by 257·k.
DEEP_STEP = 257


@dataclass
class Planes:
    """A photo as protect handles it. ``colour``: (H, W, 3) RGB or (H, W, 1) gray, uint8 levels; ``alpha``: (H, W)
    uint8 or None; ``deep``: (H, W) uint16 samples of a 16-bit gray photo (``colour`` then holds their 8-bit levels)."""

    colour: np.ndarray
    alpha: np.ndarray | None = None
    deep: np.ndarray | None = None

    @property
    def gray(self) -> bool:
        return self.colour.shape[-1] == 1


def open_photo(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Bytes -> (upright, fully loaded PIL image in its own mode, output format name), or ``BadImage``.

    The bytes first go through the project's one careful decoder (``decode_image``: bombs, truncation, malformed
    headers), so a file it refuses is quarantined with the same reason as in shard mode.
    """
    decode_image(data, max_pixels)
    img = Image.open(io.BytesIO(data))
    if img.format == "GIF":
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            raise BadImage(f"animated GIF ({frames} frames): not protected (frame-by-frame output is not supported)")
        raise BadImage("GIF: its 256-colour palette cannot hold the perturbation within ε (convert it to PNG)")
    # Phone JPEGs are often MPO (a JPEG plus a preview frame): the first frame is the photo.
    fmt = "JPEG" if img.format == "MPO" else str(img.format)
    if fmt not in OUTPUT_FORMATS:
        raise BadImage(f"{fmt}: no writer that keeps this format within ε ({', '.join(OUTPUT_FORMATS)} are)")
    img.load()
    img = _upright(img)
    if min(img.size) < MIN_SIDE:
        raise BadImage(f"too small: {img.width}x{img.height} (G needs sides >= {MIN_SIDE})")
    return img, fmt


def read_planes(img: Image.Image) -> Planes:
    """Split a PIL image of any mode into planes (CMYK, YCbCr, palette without transparency become RGB)."""
    mode = img.mode
    if mode.startswith("I;16"):
        deep = np.asarray(img).astype(np.uint16)
        return Planes(np.round(deep / DEEP_STEP).astype(np.uint8)[..., None], deep=deep)
    if mode in ("L", "1", "I", "F"):
        gray = img if mode == "L" else to_rgb(img).convert("L")  # to_rgb's rule for 32-bit samples
        return Planes(np.asarray(gray, dtype=np.uint8)[..., None])
    if mode in ("LA", "La"):
        la = np.asarray(img.convert("LA"), dtype=np.uint8)
        return Planes(la[..., :1].copy(), alpha=la[..., 1].copy())
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        return Planes(rgba[..., :3].copy(), alpha=rgba[..., 3].copy())
    return Planes(np.asarray(img.convert("RGB"), dtype=np.uint8))


def face_shape(height: int, width: int, face_size: int) -> tuple[int, int]:
    """(h, w) at which G runs: the photo's own size, or scaled so the short side is ``face_size`` when larger."""
    short = min(height, width)
    if short <= face_size:
        return height, width
    scale = face_size / short
    return max(MIN_SIDE, round(height * scale)), max(MIN_SIDE, round(width * scale))


def face_scale_delta(rgb: np.ndarray, label: int, perturber: Perturber, face_size: int) -> torch.Tensor:
    """G's δ for an (H, W, 3) uint8 photo, (1, H, W, 3) float in [0, 1] units, computed at the face scale.

    G is fully convolutional: run at full size it draws its pattern at full-size scale, which an attacker who
    resizes faces to the training size averages away. So δ is computed on the photo resized to ``face_size``
    (short side) and upsampled bilinearly: smooth at full size, and back to G's own pattern after the attacker's
    resize. Bilinear weights are convex, so the upsampled δ stays within G's bound; the integer clamp enforces ε.
    """
    height, width = rgb.shape[:2]
    small_h, small_w = face_shape(height, width, face_size)
    small = rgb
    if (small_h, small_w) != (height, width):
        small = np.asarray(Image.fromarray(rgb).resize((small_w, small_h), Image.Resampling.BICUBIC, reducing_gap=3.0))
    labels = torch.tensor([label], dtype=torch.long)
    delta = perturber.deltas(torch.from_numpy(np.array(small))[None], labels).float().cpu()
    if (small_h, small_w) != (height, width):
        delta = F.interpolate(delta.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False)
        delta = delta.permute(0, 2, 3, 1)
    return delta


def protect_planes(planes: Planes, label: int, perturber: Perturber, face_size: int, levels: int) -> Planes:
    """The protected planes: colour within ``levels`` of the original (integer clamp), alpha unchanged."""
    rgb = np.repeat(planes.colour, 3, axis=2) if planes.gray else planes.colour
    delta = face_scale_delta(rgb, label, perturber, face_size)
    if planes.gray:
        # One δ for R, G and B: its luma, so a black-and-white photo stays black-and-white.
        delta = sum(w * delta[..., i : i + 1] for i, w in enumerate(LUMA))
    colour = quantise_protected(torch.from_numpy(np.array(planes.colour))[None], delta, levels)[0].numpy()
    deep = None
    if planes.deep is not None:
        steps = colour.astype(np.int64)[..., 0] - planes.colour.astype(np.int64)[..., 0]
        deep = np.clip(planes.deep.astype(np.int64) + DEEP_STEP * steps, 0, 65535).astype(np.uint16)
    return Planes(colour, planes.alpha, deep)


def planes_image(planes: Planes) -> Image.Image:
    """Planes -> PIL image in the matching mode (I;16, L, LA, RGB or RGBA)."""
    if planes.deep is not None:
        return Image.fromarray(planes.deep)
    colour = planes.colour[..., 0] if planes.gray and planes.alpha is None else planes.colour
    if planes.alpha is not None:
        colour = np.concatenate([planes.colour, planes.alpha[..., None]], axis=2)
    return Image.fromarray(np.ascontiguousarray(colour))


def encode_photo(img: Image.Image, fmt: str, spec: EncodeSpec) -> bytes:
    """Encode in ``fmt`` with no metadata; lossless settings for every format but JPEG."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        # 4:4:4 at high quality, as the shard encoder does: chroma subsampling alone would exceed ε on edges.
        img.save(buf, format="JPEG", quality=spec.jpeg_quality, subsampling=0 if spec.jpeg_quality >= 90 else 2)
    elif fmt == "PNG":
        img.save(buf, format="PNG", compress_level=spec.png_level)
    elif fmt == "WEBP":
        img.save(buf, format="WEBP", lossless=True, exact=True)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def verify_written(data: bytes, original: Planes, fmt: str, levels: int) -> EncodedImage:
    """Decode the written bytes independently and measure them against the original planes."""
    try:
        written = read_planes(_upright(Image.open(io.BytesIO(data))))
    except Exception as exc:  # noqa: BLE001 - an encoder bug, not bad input: never write the file
        return EncodedImage(None, None, f"written image does not decode: {exc}")
    if original.gray and not written.gray:  # WebP stores gray as RGB: accept it only with R = G = B
        if not (
            np.array_equal(written.colour[..., 0], written.colour[..., 1])
            and np.array_equal(written.colour[..., 1], written.colour[..., 2])
        ):
            return EncodedImage(None, None, "grayscale photo written with colour")
        written.colour = written.colour[..., :1]
    if written.colour.shape != original.colour.shape:
        return EncodedImage(None, None, f"written shape {written.colour.shape} != {original.colour.shape}")
    check = measure(written.colour, original.colour)
    if fmt == "JPEG":
        return EncodedImage(data, check)
    if (original.alpha is None) != (written.alpha is None) or (
        original.alpha is not None and not np.array_equal(original.alpha, written.alpha)
    ):
        return EncodedImage(None, check, "alpha changed by the encoder")
    if check.max_abs > levels:
        return EncodedImage(None, check, f"eps bound violated after encoding: {check.max_abs} levels")
    return EncodedImage(data, check)


@dataclass
class PhotoResult:
    """One photo's outcome: ``encoded`` (bytes + ε check, or the quarantine reason), the input's PIL mode and the
    written format (empty when the photo could not be opened)."""

    encoded: EncodedImage
    mode: str = ""
    format: str = ""


def protect_photo(
    data: bytes, label: int, perturber: Perturber, spec: EncodeSpec, face_size: int, max_pixels: int
) -> PhotoResult:
    """Input bytes -> the bytes to write (checked against ε) or the reason the photo is quarantined."""
    try:
        img, fmt = open_photo(data, max_pixels)
    except BadImage as exc:
        return PhotoResult(EncodedImage(None, None, str(exc)))
    original = read_planes(img)
    protected = protect_planes(original, label, perturber, face_size, spec.levels)
    try:
        written = encode_photo(planes_image(protected), fmt, spec)
    except (OSError, ValueError) as exc:
        return PhotoResult(EncodedImage(None, None, f"{fmt} encoder refused {img.mode}: {exc}"), img.mode, fmt)
    return PhotoResult(verify_written(written, original, fmt, spec.levels), img.mode, fmt)
