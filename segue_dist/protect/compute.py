"""Running G on a batch of uint8 images: bit-exact per image on CPU (or batched, for callers that fix the batch
composition themselves), batched bf16 on CUDA."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from segue_dist.protect.quantise import quantise_protected


class Perturber:
    """Runs G on a batch of same-size uint8 images (N, H, W, 3) and returns the protected uint8 images (N, H, W, 3)
    on the device it computed on.

    CPU: by default each image goes through G alone, so its bytes never depend on the batch it came in.
    ``batched=True`` runs the whole batch in one forward on the calling thread instead (about twice the images/s
    for the small default G): the output then depends on the batch's composition, so only callers that fix it
    (folder mode: fixed chunks of the sorted input list) may ask for it. ``cpu_bf16=True`` runs G under bf16
    autocast on the CPU (folder mode's default where the CPU has native bf16, ``cpu_has_bf16``).
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        device: torch.device,
        levels: int,
        threads: int,
        batched: bool = False,
        cpu_bf16: bool = False,
    ) -> None:
        self.generator = generator
        self.device = device
        self.levels = levels
        self.on_cuda = device.type == "cuda"
        self.batched = batched and not self.on_cuda
        self.cpu_bf16 = cpu_bf16 and not self.on_cuda
        self.pool = None if self.on_cuda or self.batched or threads <= 1 else make_thread_pool(threads, "generator")
        if self.batched:
            # Measured on CPU (default G, batch 16, one thread): channels-last weights take 7.1 instead of 10.0 ms an
            # image at 64 px (oneDNN's NHWC kernels, fewer layout copies); NHWC uint8 input is channels-last already.
            generator.to(memory_format=torch.channels_last)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def compute_label(self) -> str:
        if self.on_cuda:
            return f"cuda-bf16:{torch.cuda.get_device_name(self.device)}"
        return f"cpu-{'bf16' if self.cpu_bf16 else 'fp32'}-{'batch' if self.batched else 'per-image'}"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return self._cuda(images, labels)
        return quantise_protected(images, self.deltas(images, labels), self.levels).contiguous()

    def deltas(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G's float δ (N, H, W, 3) in [0, 1] units for uint8 images (N, H, W, 3), not yet quantised.

        Folder mode needs δ itself: it computes δ at the face scale and upsamples it before quantising.
        """
        if self.on_cuda:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                images = images.to(self.device, non_blocking=True)
                delta = self.generator(images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0), labels.to(self.device))
            return delta.float().permute(0, 2, 3, 1)
        if self.batched:
            deltas = [self._forward(images, labels)]
        elif self.pool is None:
            deltas = [self._forward(images[i : i + 1], labels[i : i + 1]) for i in range(len(images))]
        else:
            deltas = list(
                self.pool.map(lambda i: self._forward(images[i : i + 1], labels[i : i + 1]), range(len(images)))
            )
        return torch.cat(deltas).permute(0, 2, 3, 1)

    def _forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # On one intra-op thread, one image at a time (or one fixed batch): float32 CPU kernels then give the same
        # bits whatever the number of threads or ranks (batched GEMMs and thread splits change the low bits).
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16):
            return self.generator(image.permute(0, 3, 1, 2).to(torch.float32).div_(255.0), label).float()

    def _cuda(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Asynchronous: nothing here waits for the GPU, so the main thread goes on to the next batch.
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                # NHWC memory seen as NCHW is channels_last: the layout cuDNN's fast kernels want, without a copy.
                delta = self.generator(images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0), labels)
            return quantise_protected(images, delta.float().permute(0, 2, 3, 1), self.levels).contiguous()


def make_thread_pool(threads: int, name: str) -> ThreadPoolExecutor:
    # torch.set_num_threads is per thread: each pool thread must be told to use one intra-op thread itself.
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX): there, bf16 autocast halves G's CPU time.

    Measured here (AMD EPYC, AVX512-BF16; default G, batch 16 at 64 px, one thread): 2.8 instead of 5.7 ms an
    image, δ within 0.01 of a level of fp32's.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
