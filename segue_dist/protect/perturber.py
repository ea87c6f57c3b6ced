"""Running G on batches of uint8 images: one forward for both modes, batched on every device.

The bytes a batch gives depend on its composition (float kernels sum in a batch- and thread-dependent order, which
can flip the odd rounding to uint8), so callers fix the composition themselves: shard mode batches each shard's
images in shard order (:class:`.stream.SizeBuckets`), folder mode fixed chunks of the sorted photo list; on the CPU
every forward runs on one intra-op thread (:func:`make_thread_pool`), the parallelism being across batches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from segue_dist.protect.quantise import quantise_protected


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX): there, bf16 autocast halves G's CPU time
    (measured in ``docs/protect_benchmarks.md``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether G runs under bf16 autocast: ``precision`` is ``auto`` (CUDA always, CPU where native), ``bf16`` or
    ``fp32``."""
    if precision == "auto":
        return device.type == "cuda" or cpu_has_bf16()
    return precision == "bf16"


class Perturber:
    """G on a batch of same-size uint8 images (N, H, W, 3) with labels (N,): δ, or the protected uint8 images.

    Inference only: ``torch.inference_mode``, channels-last weights (oneDNN's and cuDNN's NHWC kernels take the
    NHWC uint8 input, seen as NCHW, without a layout copy) and bf16 autocast where :func:`use_bf16` says so.
    On CUDA nothing waits for the GPU: the results stay on the device until the caller copies them.
    """

    def __init__(
        self, generator: torch.nn.Module, device: torch.device, eps_levels: int, precision: str = "auto"
    ) -> None:
        self.generator = generator.to(memory_format=torch.channels_last).eval()
        self.device = device
        self.eps_levels = eps_levels
        self.on_cuda = device.type == "cuda"
        self.bf16 = use_bf16(precision, device)

    def compute_label(self) -> str:
        """What the bytes depend on besides the batch: recorded in ``_protect.json`` (a resume warns on a change)."""
        if self.on_cuda:
            return f"cuda-{'bf16' if self.bf16 else 'fp32'}:{torch.cuda.get_device_name(self.device)}"
        return f"cpu-{'bf16' if self.bf16 else 'fp32'}-batch"

    def deltas(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G's float δ (N, H, W, 3) in [0, 1] units for uint8 images (N, H, W, 3), on the compute device, not
        quantised (folder mode up-samples δ first)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            # NHWC memory seen as NCHW is channels_last: the layout the fast kernels want, without a copy.
            delta = self.generator(images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0), labels)
        return delta.float().permute(0, 2, 3, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Protected uint8 images (N, H, W, 3), contiguous, on the compute device: ``quantise_protected`` of δ."""
        images = images.to(self.device, non_blocking=True)  # once: deltas() then finds it on the device
        with torch.inference_mode():
            delta = self.deltas(images, labels)
            return quantise_protected(images, delta, self.eps_levels).contiguous()


def make_thread_pool(threads: int, name: str) -> ThreadPoolExecutor:
    # torch.set_num_threads is per thread: each pool thread must be told to use one intra-op thread itself.
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))
