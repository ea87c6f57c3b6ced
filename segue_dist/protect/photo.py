"""One photo in folder mode: decoded at its own size, mode and orientation, protected at the face scale, written
back in its own format, and checked against ε on the decoded bytes of what is written.

A photo is split into *planes*: the colour plane G perturbs (RGB, or one gray channel that gets a luminance δ),
the alpha plane (kept bit for bit) and, for 16-bit gray, the 16-bit samples (δ is added in whole 8-bit levels,
i.e. multiples of 257). Metadata (EXIF, ICC, XMP, text chunks) is not copied: the written file carries pixels only,
unless ``--keep-metadata`` asks for the ICC profile and EXIF without GPS or thumbnail (:mod:`.metadata`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segue_dist.data.images import BadImage, _upright, open_image, to_rgb
from segue_dist.protect.codecs import EncodedImage, encode_pil, verify_decoded
from segue_dist.protect.metadata import NO_METADATA, Metadata, kept_metadata
from segue_dist.protect.options import MIN_SIDE
from segue_dist.protect.perturber import Perturber
from segue_dist.protect.quantise import delta_levels

# Formats written back as themselves, all losslessly except JPEG (PIL format names).
LOSSLESS_FORMATS = ("PNG", "WEBP", "BMP", "TIFF")
OUTPUT_FORMATS = ("JPEG", *LOSSLESS_FORMATS)
# ITU-R 601 luma, the weights PIL's convert("L") uses: a gray photo's δ is the luma of G's colour δ.
LUMA = (0.299, 0.587, 0.114)
# 16-bit samples per 8-bit level (65535 / 255): a δ of k levels moves a 16-bit sample by 257·k.
DEEP_STEP = 257


@dataclass(frozen=True)
class PhotoFormat:
    """How folder mode writes a photo in its own format: PNG zlib level, JPEG quality, and ε in uint8 levels."""

    png_level: int
    jpeg_quality: int
    eps_levels: int


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

    Decoded once, by the project's one careful decoder (``open_image``: bombs, truncation, malformed headers), so a
    file it refuses is quarantined with the same reason as in shard mode.
    """
    opened = open_image(data, max_pixels)
    if opened.format == "GIF":
        if opened.frames > 1:
            raise BadImage(
                f"animated GIF ({opened.frames} frames): not protected (frame-by-frame output is not supported)"
            )
        raise BadImage("GIF: its 256-colour palette cannot hold the perturbation within ε (convert it to PNG)")
    # Phone JPEGs are often MPO (a JPEG plus a preview frame): the first frame is the photo.
    fmt = "JPEG" if opened.format == "MPO" else opened.format
    if fmt not in OUTPUT_FORMATS:
        raise BadImage(f"{fmt}: no writer that keeps this format within ε ({', '.join(OUTPUT_FORMATS)} are)")
    img = opened.image
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
    return Planes(np.asarray(img if mode == "RGB" else img.convert("RGB"), dtype=np.uint8))


def face_shape(height: int, width: int, face_size: int) -> tuple[int, int]:
    """(h, w) at which G runs: the photo's own size, or scaled so the short side is ``face_size`` when larger."""
    short = min(height, width)
    if short <= face_size:
        return height, width
    scale = face_size / short
    return max(MIN_SIDE, round(height * scale)), max(MIN_SIDE, round(width * scale))


def face_input(planes: Planes, face_size: int) -> np.ndarray:
    """What G sees of a photo: its colour as (h, w, 3) uint8 RGB at the face scale (``face_shape``; a gray photo's
    level repeated in R, G and B). Down-sampling is PIL's antialiased bicubic, as ``segue shards build`` resizes."""
    rgb = np.repeat(planes.colour, 3, axis=2) if planes.gray else planes.colour
    height, width = rgb.shape[:2]
    small_h, small_w = face_shape(height, width, face_size)
    if (small_h, small_w) == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((small_w, small_h), Image.Resampling.BICUBIC, reducing_gap=3.0))


def upsample_delta(delta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """G's face-scale δ (h, w, C) float -> (C, height, width) float, bilinear (a copy at the same size).

    G is fully convolutional: run at full size it draws its pattern at full-size scale, which an attacker who
    resizes faces to the training size may average away. So δ is computed at the face scale and upsampled: smooth
    at full size, and back to G's own pattern after the attacker's resize. Bilinear weights are convex, so the
    upsampled δ stays within G's bound. Channels-first on purpose: on one CPU thread the interpolation of contiguous
    NCHW is faster than of channels-last (docs/measurements.md).
    """
    chw = delta.permute(2, 0, 1).contiguous()
    if tuple(chw.shape[1:]) == (height, width):
        return chw
    return F.interpolate(chw[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def face_scale_delta(rgb: np.ndarray, label: int, perturber: Perturber, face_size: int) -> torch.Tensor:
    """G's δ for one (H, W, 3) uint8 photo, (1, H, W, 3) float in [0, 1] units: computed at the face scale
    (``face_input``) and upsampled to the photo's size (``upsample_delta``)."""
    small = face_input(Planes(rgb), face_size)
    delta = perturber.deltas(torch.from_numpy(np.array(small))[None], torch.tensor([label]))[0].float().cpu()
    return upsample_delta(delta, *rgb.shape[:2]).permute(1, 2, 0)[None]


def protect_planes(planes: Planes, face_delta: torch.Tensor, eps_levels: int) -> Planes:
    """The protected planes from G's face-scale δ (h, w, 3): colour within ``eps_levels`` of the original (integer
    clamp), alpha unchanged, 16-bit samples moved by the same whole levels."""
    if planes.gray:
        # One δ for R, G and B: its luma, so a black-and-white photo stays black-and-white. Luma and bilinear
        # up-sampling are both linear, so taking the luma first (on the small δ) gives the same δ for less work.
        face_delta = sum(w * face_delta[..., i : i + 1] for i, w in enumerate(LUMA))  # type: ignore[assignment]
    height, width = planes.colour.shape[:2]
    # On the device δ was computed on: with G on a GPU the up-sampling runs there too, and only whole levels
    # come back to the host, whose cores are busy with the codecs.
    # Rounded in whole levels by the one quantiser (quantise.delta_levels), then transposed as int16 (half the
    # bytes of float32 to move).
    delta_int = delta_levels(upsample_delta(face_delta.float(), height, width), eps_levels).permute(1, 2, 0)
    delta_int = delta_int.contiguous().cpu()
    colour = np.clip(planes.colour.astype(np.int16) + delta_int.numpy(), 0, 255).astype(np.uint8)
    deep = None
    if planes.deep is not None:
        moved = colour.astype(np.int64)[..., 0] - planes.colour.astype(np.int64)[..., 0]
        deep = np.clip(planes.deep.astype(np.int64) + DEEP_STEP * moved, 0, 65535).astype(np.uint16)
    return Planes(colour, planes.alpha, deep)


def planes_image(planes: Planes) -> Image.Image:
    """Planes -> PIL image in the matching mode (I;16, L, LA, RGB or RGBA)."""
    if planes.deep is not None:
        return Image.fromarray(planes.deep)
    colour = planes.colour[..., 0] if planes.gray and planes.alpha is None else planes.colour
    if planes.alpha is not None:
        colour = np.concatenate([planes.colour, planes.alpha[..., None]], axis=2)
    return Image.fromarray(np.ascontiguousarray(colour))


def encode_photo(img: Image.Image, fmt: str, spec: PhotoFormat, metadata: Metadata = NO_METADATA) -> bytes:
    """Encode in ``fmt`` with only the given metadata (none by default), by the one encoder of both modes
    (``codecs.encode_pil``: lossless settings for every format but JPEG, 4:4:4 JPEG at quality >= 90)."""
    if fmt == "JPEG" and img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return encode_pil(img, fmt, spec.png_level, spec.jpeg_quality, metadata.save_options(fmt, img.mode))


def verify_written(data: bytes, original: Planes, fmt: str, eps_levels: int) -> EncodedImage:
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
    lossless = fmt != "JPEG"
    same_alpha = (original.alpha is None and written.alpha is None) or (
        original.alpha is not None and written.alpha is not None and np.array_equal(original.alpha, written.alpha)
    )
    if lossless and not same_alpha and written.colour.shape == original.colour.shape:
        return EncodedImage(None, None, "alpha changed by the encoder")
    return verify_decoded(data, written.colour, original.colour, eps_levels, lossless)


@dataclass
class PhotoResult:
    """One photo's outcome: ``encoded`` (bytes + ε check, or the quarantine reason), the input's PIL mode and the
    written format (empty when the photo could not be opened)."""

    encoded: EncodedImage
    mode: str = ""
    format: str = ""


@dataclass
class OpenedPhoto:
    """A photo between decode and G: its planes, input mode, output format, ``face`` (what G sees, h x w x 3) and
    the metadata to write with it."""

    planes: Planes
    mode: str
    format: str
    face: np.ndarray
    metadata: Metadata = NO_METADATA


def open_for_protect(data: bytes, max_pixels: int, face_size: int, keep_metadata: bool = False) -> OpenedPhoto:
    """Bytes -> an ``OpenedPhoto`` ready for G, or ``BadImage`` with the reason it is quarantined."""
    img, fmt = open_photo(data, max_pixels)
    planes = read_planes(img)
    metadata = kept_metadata(img) if keep_metadata else NO_METADATA
    return OpenedPhoto(planes, img.mode, fmt, face_input(planes, face_size), metadata)


def finish_photo(photo: OpenedPhoto, face_delta: torch.Tensor, spec: PhotoFormat) -> PhotoResult:
    """Add G's face-scale δ (h, w, 3) to the photo, encode it in its own format and check the written bytes."""
    protected = protect_planes(photo.planes, face_delta, spec.eps_levels)
    try:
        written = encode_photo(planes_image(protected), photo.format, spec, photo.metadata)
    except (OSError, ValueError) as exc:
        reason = f"{photo.format} encoder refused {photo.mode}: {exc}"
        return PhotoResult(EncodedImage(None, None, reason), photo.mode, photo.format)
    return PhotoResult(verify_written(written, photo.planes, photo.format, spec.eps_levels), photo.mode, photo.format)


def face_deltas(photos: list[OpenedPhoto], labels: list[int], perturber: Perturber) -> list[torch.Tensor]:
    """G's δ (h, w, 3) for each photo, on the device G ran on: one forward per face shape, over the photos in the
    order given.

    The batches are made from the list as given (grouped by face shape, first-seen order), so the same list gives
    the same bytes whoever runs it; folder mode passes fixed chunks of the sorted input list.
    """
    out: list[torch.Tensor | None] = [None] * len(photos)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, photo in enumerate(photos):
        groups.setdefault(photo.face.shape, []).append(i)
    for members in groups.values():
        faces = torch.from_numpy(np.stack([photos[i].face for i in members]))
        deltas = perturber.deltas(faces, torch.tensor([labels[i] for i in members], dtype=torch.long))
        for j, i in enumerate(members):
            out[i] = deltas[j]
    return [d for d in out if d is not None]


def protect_photo(
    data: bytes, label: int, perturber: Perturber, spec: PhotoFormat, face_size: int, max_pixels: int
) -> PhotoResult:
    """Input bytes -> the bytes to write (checked against ε) or the reason the photo is quarantined (one photo;
    folder mode runs the same stages over chunks of photos)."""
    try:
        photo = open_for_protect(data, max_pixels, face_size)
    except BadImage as exc:
        return PhotoResult(EncodedImage(None, None, str(exc)))
    return finish_photo(photo, face_deltas([photo], [label], perturber)[0], spec)
