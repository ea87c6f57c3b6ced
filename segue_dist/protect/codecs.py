"""Encoding protected images and checking ε on what is written: the CPU codecs of both modes (PIL, in a pool).

One encoder (:func:`encode_pil`: PNG, JPEG, WebP, BMP, TIFF; lossless settings for all but JPEG) and one ε check on
the decoded file (:func:`verify_decoded`) serve shard mode (:func:`encode_and_verify`, RGB arrays) and folder mode
(:mod:`.photo`, photos of any mode), so the check is made on exactly the bytes a user of the protected set will load.
The GPU variant is :mod:`.gpu_codec`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch
from PIL import Image

from segue_dist.data.images import BadImage, decode_image, jpeg_subsampling
from segue_dist.metrics.image_quality import psnr_from_mse


@dataclass
class ImageCheck:
    """What the written file measures against its original, in uint8 levels (1/255 units)."""

    max_abs: int
    mean_abs: float
    psnr: float


def measure(written: np.ndarray, original: np.ndarray) -> ImageCheck:
    """Max and mean |written - original| and PSNR (capped) of two (H, W, 3) uint8 images."""
    diff = written.astype(np.int16) - original.astype(np.int16)
    absdiff = np.abs(diff)
    mse = float(np.mean(diff.astype(np.float32) ** 2))
    return ImageCheck(int(absdiff.max()), float(absdiff.mean()), psnr_from_mse(mse, 255.0))


@dataclass(frozen=True)
class EncodeSpec:
    format: str
    png_level: int
    jpeg_quality: int
    eps_levels: int

    @property
    def extension(self) -> str:
        return "png" if self.format == "png" else "jpg"

    def describe(self) -> dict[str, Any]:
        setting = {"png_level": self.png_level} if self.format == "png" else {"jpeg_quality": self.jpeg_quality}
        return {"format": self.format, **setting}


@dataclass
class EncodedImage:
    """One encoded image and its check; ``error`` set (and ``data`` None) when it must be quarantined."""

    data: bytes | None
    check: ImageCheck | None
    error: str | None = None


def encode_pil(
    img: Image.Image, fmt: str, png_level: int, jpeg_quality: int, extra: dict[str, Any] | None = None
) -> bytes:
    """Encode a PIL image in ``fmt`` (PIL name: JPEG, PNG, WEBP, BMP, TIFF); every format but JPEG losslessly.
    ``extra``: further ``Image.save`` options (the metadata folder mode keeps)."""
    buf = io.BytesIO()
    extra = extra or {}
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=jpeg_subsampling(jpeg_quality), **extra)
    elif fmt == "PNG":
        img.save(buf, format="PNG", compress_level=png_level, **extra)
    elif fmt == "WEBP":
        img.save(buf, format="WEBP", lossless=True, exact=True, **extra)
    else:
        img.save(buf, format=fmt, **extra)
    return buf.getvalue()


def encode_image(protected: np.ndarray, spec: EncodeSpec) -> bytes:
    """One (H, W, 3) uint8 RGB image in shard mode's output format."""
    fmt = "PNG" if spec.format == "png" else "JPEG"
    return encode_pil(Image.fromarray(np.ascontiguousarray(protected), "RGB"), fmt, spec.png_level, spec.jpeg_quality)


def verify_decoded(
    data: bytes,
    written: np.ndarray,
    original: np.ndarray,
    eps_levels: int,
    lossless: bool,
    expected: np.ndarray | None = None,
) -> EncodedImage:
    """The ε check of both modes on a written file: ``written`` (its decoded pixels, (H, W, C) uint8) against the
    ``original`` (same shape). Lossy files pass with their measured bound; a lossless one is refused (data None,
    with the reason) if it is not ``expected`` pixel for pixel (when given) or if it moves a pixel past ``eps_levels``.
    """
    if written.shape != original.shape:
        return EncodedImage(None, None, f"written shape {written.shape} != {original.shape}")
    check = measure(written, original)
    if lossless and expected is not None and not np.array_equal(written, expected):
        return EncodedImage(None, check, f"lossless encoder changed the pixels: {check.max_abs} levels")
    if lossless and check.max_abs > eps_levels:
        # Cannot happen with the integer clamp and a lossless codec; if it ever does, it is not written.
        return EncodedImage(None, check, f"eps bound violated after encoding: {check.max_abs} levels")
    return EncodedImage(data, check)


def encode_and_verify(protected: np.ndarray, original: Sequence[np.ndarray], spec: EncodeSpec) -> list[EncodedImage]:
    """Encode (N, H, W, 3) uint8 images, decode each file again and measure it against the original.

    Runs in the encode pool (threads or processes: PIL releases the GIL while it compresses). The check is made
    on the decoded bytes, i.e. on exactly what a user of the protected set will load.
    """
    results = []
    for image, source in zip(protected, original, strict=True):
        data = encode_image(image, spec)
        try:
            written = np.asarray(decode_image(data), dtype=np.uint8)
        except BadImage as exc:  # an encoder bug, not bad input: keep going, but never write the file
            results.append(EncodedImage(None, None, f"written image does not decode: {exc}"))
            continue
        results.append(verify_decoded(data, written, source, spec.eps_levels, spec.format == "png", expected=image))
    return results


def _pool_initializer() -> None:
    # Encoders must not fight the main thread (G) for cores with torch's own thread pool.
    torch.set_num_threads(1)


def make_encode_pool(backend: str, workers: int) -> Executor:
    if backend == "process":
        # spawn, not fork: forking a process that already runs torch and loader threads can deadlock.
        return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_pool_initializer)
    return ThreadPoolExecutor(workers, thread_name_prefix="encode")


def encode_when_ready(
    ready: Any, protected: np.ndarray, original: Sequence[np.ndarray], spec: EncodeSpec
) -> list[EncodedImage]:
    """`encode_and_verify` once the GPU->host copy of ``protected`` has landed (``ready``: a CUDA event)."""
    ready.synchronize()  # releases the GIL while it waits
    return encode_and_verify(protected, original, spec)
