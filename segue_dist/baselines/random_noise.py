"""Random-noise baseline: uniform L-infinity noise, sample-wise or class-wise (Huang et al. 2021, Table 1 control).

Sample-wise random noise is the classic *negative* control (models learn through it); class-wise random noise is
already a weak shortcut because every image of a class carries the same pattern. Both are deterministic functions of
``seed`` and a stable per-sample key (sample-wise) or the label (class-wise), never of batch order or global RNG state,
so a sharded / multi-worker pipeline produces the same noise as a single process.

Library module: no I/O, no printing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from segue_dist.utils.seed import derive_seed

__all__ = ["RandomNoise", "Key"]

Key = int | str


def _keys_list(keys: Sequence[Key] | Tensor, n: int, what: str) -> list[Key]:
    out: list[Key] = keys.reshape(-1).tolist() if isinstance(keys, Tensor) else list(keys)
    if len(out) != n:
        raise ValueError(f"{what}: got {len(out)} keys for a batch of {n}")
    return out


def _uniform(shape: tuple[int, ...], eps: float, seed: int) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    # U[0,1) -> U[-eps, eps): scaling after sampling keeps the same draws for every eps (only the amplitude changes).
    return (torch.rand(shape, generator=g, dtype=torch.float32) * 2.0 - 1.0) * eps


@dataclass
class RandomNoise:
    """Uniform ``U(-eps, eps)`` noise per pixel and channel, in [0, 1] pixel units.

    Args:
        eps: L-infinity budget (default 8/255).
        seed: base seed; per-sample / per-class seeds are ``derive_seed(seed, ...)``.
        classwise: one pattern per class (shared by all its images) instead of one per sample.
        base_size: class-wise only. ``None``: each class pattern is drawn at the requested ``(H, W)`` (seeded by label
            *and* size, so a different size gives a different pattern). ``(h, w)``: the pattern is drawn once at that
            size and nearest-resized to any ``(H, W)``, so every image of a class carries "the same" pattern whatever
            its size. Nearest (not bilinear) resizing keeps values inside ``[-eps, eps]`` and the marginal distribution
            uniform.
    """

    eps: float = 8 / 255
    seed: int = 0
    classwise: bool = False
    base_size: tuple[int, int] | None = None
    _cache: dict[tuple[int, int, int], Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0.0 < float(self.eps) <= 1.0):
            raise ValueError(f"RandomNoise.eps must be in (0, 1], got {self.eps}")
        if not isinstance(self.seed, int):
            raise ValueError(f"RandomNoise.seed must be an int, got {self.seed!r}")
        if self.base_size is not None:
            if len(self.base_size) != 2 or min(self.base_size) < 1:
                raise ValueError(f"RandomNoise.base_size must be (h, w) with h, w >= 1, got {self.base_size}")
            if not self.classwise:
                raise ValueError("RandomNoise.base_size only applies to classwise=True")
            self.base_size = (int(self.base_size[0]), int(self.base_size[1]))

    # ----------------------------------------------------------------------------------------------------------------
    def class_pattern(self, label: int, size: tuple[int, int]) -> Tensor:
        """The ``(3, H, W)`` pattern of one class (class-wise mode), CPU float32."""
        h, w = int(size[0]), int(size[1])
        if h < 1 or w < 1:
            raise ValueError(f"RandomNoise: size must be positive, got {size}")
        label = int(label)
        if label < 0:
            raise ValueError(f"RandomNoise: labels must be >= 0, got {label}")
        ck = (label, h, w)
        if ck not in self._cache:
            if self.base_size is None:
                pat = _uniform((3, h, w), self.eps, derive_seed(self.seed, "random-classwise", label, h, w))
            else:
                bh, bw = self.base_size
                base = _uniform((3, bh, bw), self.eps, derive_seed(self.seed, "random-classwise", label, bh, bw))
                pat = base if (bh, bw) == (h, w) else F.interpolate(base[None], size=(h, w), mode="nearest-exact")[0]
            self._cache[ck] = pat
        return self._cache[ck]

    def sample_noise(self, key: Key, size: tuple[int, int]) -> Tensor:
        """The ``(3, H, W)`` noise of one sample (sample-wise mode), keyed by a stable id (index or shard key)."""
        return _uniform((3, int(size[0]), int(size[1])), self.eps, derive_seed(self.seed, "random-samplewise", key))

    def perturbation(
        self,
        labels: Tensor | None,
        keys: Sequence[Key] | Tensor | None = None,
        *,
        size: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``(B, 3, H, W)`` noise with ``|delta| <= eps``; needs ``labels`` (class-wise) or ``keys`` (sample-wise)."""
        if self.classwise:
            if labels is None:
                raise ValueError("RandomNoise(classwise=True).perturbation needs labels")
            lab = labels.reshape(-1).tolist()
            out = torch.stack([self.class_pattern(c, size) for c in lab]) if lab else torch.empty(0, 3, *size)
        else:
            if keys is None:
                raise ValueError(
                    "RandomNoise(classwise=False).perturbation needs keys: a stable per-sample id (dataset index or "
                    "shard key), so the same image always gets the same noise"
                )
            n = len(keys) if not isinstance(keys, Tensor) else keys.numel()
            ks = _keys_list(keys, n, "RandomNoise")
            out = torch.stack([self.sample_noise(k, size) for k in ks]) if ks else torch.empty(0, 3, *size)
        return out.to(device) if device is not None else out

    def apply(self, x: Tensor, labels: Tensor | None = None, keys: Sequence[Key] | Tensor | None = None) -> Tensor:
        """``(x + delta).clamp(0, 1)`` for a ``(B, 3, H, W)`` batch in [0, 1]."""
        if x.dim() != 4:
            raise ValueError(f"RandomNoise.apply: expected (B, 3, H, W), got {tuple(x.shape)}")
        if labels is not None and labels.numel() != x.shape[0]:
            raise ValueError(f"RandomNoise.apply: {labels.numel()} labels for a batch of {x.shape[0]}")
        if keys is not None and (keys.numel() if isinstance(keys, Tensor) else len(keys)) != x.shape[0]:
            raise ValueError("RandomNoise.apply: number of keys differs from the batch size")
        delta = self.perturbation(labels, keys, size=(x.shape[-2], x.shape[-1]), device=x.device)
        return (x + delta.to(x.dtype)).clamp(0.0, 1.0)
