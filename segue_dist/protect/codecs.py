"""Encoding protected images and checking ε on what is written: CPU codecs (PIL, in an encode pool).

Each image is encoded (PNG, lossless, or JPEG), decoded again and measured against its original, so the ε check is
made on exactly the bytes a user of the protected set will load. The GPU variant is :mod:`.gpu_codec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch

from segue_dist.data.images import BadImage, decode_image, encode_jpeg, encode_png
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
    levels: int

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


def encode_image(protected: np.ndarray, spec: EncodeSpec) -> bytes:
    if spec.format == "png":
        return encode_png(protected, compress_level=spec.png_level)
    return encode_jpeg(protected, quality=spec.jpeg_quality)


def encode_and_verify(protected: np.ndarray, original: Sequence[np.ndarray], spec: EncodeSpec) -> list[EncodedImage]:
    """Encode (N, H, W, 3) uint8 images, decode each file again and measure it against the original.

    Runs in the encode pool (threads or processes: PIL releases the GIL while it compresses). The check is made
    on the decoded bytes, i.e. on exactly what a user of the protected set will load.
    """
    results = []
    for image, source in zip(protected, original, strict=True):
        data = encode_image(np.ascontiguousarray(image), spec)
        try:
            written = np.asarray(decode_image(data), dtype=np.uint8)
        except BadImage as exc:  # an encoder bug, not bad input: keep going, but never write the file
            results.append(EncodedImage(None, None, f"written image does not decode: {exc}"))
            continue
        check = measure(written, source)
        if spec.format == "png" and (not np.array_equal(written, image) or check.max_abs > spec.levels):
            # Cannot happen with the integer clamp and a lossless codec; if it ever does, it is not written.
            results.append(EncodedImage(None, check, f"eps bound violated after encoding: {check.max_abs} levels"))
            continue
        results.append(EncodedImage(data, check))
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
