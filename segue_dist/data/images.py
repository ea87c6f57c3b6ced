"""Decoding and encoding face images safely.

Every decoder in the project goes through ``decode_image`` so corrupt, truncated, CMYK, grayscale, alpha and
decompression-bomb inputs are handled the same way everywhere: converted to RGB where that is lossless in meaning,
otherwise rejected with a ``BadImage`` whose message is the one-line reason recorded in stats and quarantine lists.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# Faces are small; anything over this is a decompression bomb or a mistake, not a face photo.
DEFAULT_MAX_PIXELS = 50_000_000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class BadImage(ValueError):
    """An input that cannot become an RGB image; ``str(exc)`` is the reason."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> fully loaded, upright RGB PIL image, or ``BadImage`` with the reason.

    Any failure inside the decoder (Pillow plugins raise far more than ``OSError`` on hostile input) is a
    ``BadImage``, so one bad file can never stop a build or a loader.
    """
    opened = open_image(data, max_pixels)
    try:
        return to_rgb(opened.image)
    except Exception as exc:  # noqa: BLE001 - an odd mode's conversion failing is this file's problem, not the job's
        raise BadImage(f"cannot convert {opened.image.mode} to RGB ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class OpenedImage:
    """A decoded image in its own mode: ``image`` fully loaded and upright (EXIF orientation applied), ``format``
    the container's PIL format name (``JPEG``, ``PNG``, ``MPO``, ...) and ``frames`` its frame count."""

    image: Image.Image
    format: str
    frames: int


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> OpenedImage:
    """Bytes -> the loaded, upright image in its own mode, or ``BadImage`` with the reason (``decode_image``'s
    checks: empty, unrecognised, truncated, malformed, decompression bomb). Decodes once."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"too large: {width}x{height} exceeds {max_pixels} pixels (decompression bomb guard)")
            fmt, frames = str(img.format), int(getattr(img, "n_frames", 1))
            img.load()
            return OpenedImage(_upright(img), fmt, frames)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too large: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - struct.error, IndexError, ... from malformed headers
        raise BadImage(f"corrupt image ({type(exc).__name__}: {exc})") from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos); a broken EXIF block leaves the pixels as stored."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not a reason to drop the photo
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (a photo's usual background), not dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16"):
        # 16-bit samples: keep the brightness (full scale is 65535), do not stretch each image to its own max.
        arr = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        if peak > 65535.0:
            arr = arr / peak * 255.0
        elif peak > 255.0:  # 16-bit data read as 32-bit integers
            arr = arr / 257.0
        arr = np.nan_to_num(arr, nan=0.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize the short side to the target (antialiased), then centre-crop to ``size`` (int = square, or (h, w))."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    width, height = img.size
    scale = max(out_w / width, out_h / height)
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    return img.crop((left, top, left + out_w, top + out_h))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float32 CHW in [0, 1]."""
    import torch  # imported here so decoding alone (the shard builder) never pays for importing torch

    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> uint8 CHW (cheaper to ship between loader workers than float)."""
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float CHW in [0, 1] -> uint8 HWC, rounding to nearest (the quantisation the ε check is made on)."""
    import torch

    return x.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def encode_png(arr: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def jpeg_subsampling(quality: int) -> int:
    """PIL's ``subsampling`` for a JPEG at ``quality``: 4:4:4 (0) at 90 and above, where chroma subsampling alone
    would cost more than the quality buys (and exceed a protect ε on edges), else 4:2:0 (2). The one rule for every
    JPEG the project writes."""
    return 0 if quality >= 90 else 2


def encode_jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality, subsampling=jpeg_subsampling(quality))
    return buf.getvalue()


def sniff_format(data: bytes) -> str | None:
    """'jpg' / 'png' / None from magic bytes (extensions lie)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None
