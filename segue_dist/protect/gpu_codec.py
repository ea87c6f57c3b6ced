"""nvJPEG through torchvision (``--gpu-codec``): batched JPEG decode of inputs, JPEG encode + verify on the GPU."""

from __future__ import annotations

import warnings

import torch

from segue_dist.metrics.image_quality import psnr_from_mse
from segue_dist.protect.codecs import EncodedImage, EncodeSpec, ImageCheck


class GpuCodec:
    """nvJPEG through torchvision: batched decode of JPEG inputs and, for JPEG output, encode + verify on the GPU.

    Optional and defensive: a batched decode that fails is retried image by image and then on the CPU, and if GPU
    encoding is unavailable the CPU encode pool takes over, so an odd file or torchvision build never stops the job.
    The ε check is then made against nvJPEG's decode of the input, which may differ from libjpeg's by a level.
    """

    def __init__(self, device: torch.device, spec: EncodeSpec) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        # torchvision >= 0.29 deprecates its codecs in favour of TorchCodec; they still work, and say so per call.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        self.device, self.spec = device, spec
        self.decode_jpeg, self.encode_jpeg, self.rgb = decode_jpeg, encode_jpeg, ImageReadMode.RGB
        self.encode_on_gpu = spec.format == "jpeg"

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """CHW uint8 CUDA tensors (None where nvJPEG refuses a file)."""
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(self.decode_jpeg(tensors, mode=self.rgb, device=self.device))
        except Exception:  # noqa: BLE001 - one bad file fails the whole batched call: retry one by one
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(self.decode_jpeg(t, mode=self.rgb, device=self.device))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out

    def encode_and_verify(self, protected: torch.Tensor, original: torch.Tensor) -> list[EncodedImage] | None:
        """JPEG-encode (N, H, W, 3) uint8 CUDA images and measure the decoded files against the originals; None if
        this torchvision cannot encode on the GPU (the caller then encodes on the CPU from now on)."""
        chw = protected.permute(0, 3, 1, 2).contiguous()
        try:
            encoded = [e.cpu() for e in self.encode_jpeg(list(chw), quality=self.spec.jpeg_quality)]
        except Exception:  # noqa: BLE001
            self.encode_on_gpu = False
            return None
        written = torch.stack(list(self.decode_jpeg(encoded, mode=self.rgb, device=self.device)))
        diff = written.to(torch.int16) - original.permute(0, 3, 1, 2).to(torch.int16)
        absdiff = diff.abs().flatten(1)
        max_abs = absdiff.amax(1).tolist()
        mean_abs = absdiff.float().mean(1).tolist()
        mse = diff.float().pow(2).flatten(1).mean(1).tolist()
        out = []
        for blob, m, a, e in zip(encoded, max_abs, mean_abs, mse, strict=True):
            check = ImageCheck(int(m), float(a), psnr_from_mse(e, 255.0))
            out.append(EncodedImage(blob.numpy().tobytes(), check))
        return out
