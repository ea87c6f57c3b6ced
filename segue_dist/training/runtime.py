"""Where a training process runs and how it steps a model: DDP through Accelerate, or one DeepSpeed engine per model.

The WebDataset stream is *not* passed to `accelerator.prepare`: it already yields each rank its own fixed number of
batches (segue_dist/data/loader.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segue_dist.config import ConfigError
from segue_dist.training.config import TrainConfig


@dataclass
class Runtime:
    """Where this process stands in the job and what it computes with."""

    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    accelerator: Any = None  # accelerate.Accelerator in DDP mode
    deepspeed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def mean_across_ranks(self, values: list[float]) -> list[float]:
        """Element-wise mean of ``values`` over all ranks (float64 all-reduce); every rank must pass the same length."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors live: the GPU for nccl, the CPU for gloo."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def silence_broadcast_buffers_deprecation() -> None:
    """Hide torch >= 2.13's FutureWarning for DDP's ``broadcast_buffers``, which we set on purpose.

    Accelerate's DistributedDataParallelKwargs has no ``forward_sync_buffers`` (the replacement), and the replacement
    would also sync buffers at init, which ``broadcast_buffers=False`` does not: the warning itself says to keep
    ``broadcast_buffers=False`` in that case. Only this message is filtered; every other FutureWarning still shows.
    """
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


def deepspeed_requested(cfg: TrainConfig) -> str:
    """The DeepSpeed JSON to use: `deepspeed=` in the config, or the one an Accelerate DeepSpeed config names."""
    if cfg.deepspeed:
        return cfg.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if not path:
            raise ConfigError("the Accelerate config enables DeepSpeed but names no deepspeed_config_file")
        return path
    return ""


def make_runtime(cfg: TrainConfig) -> Runtime:
    """Join the job (DeepSpeed's or Accelerate's process group) and pick device and autocast precision."""
    cuda = torch.cuda.is_available()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if deepspeed_requested(cfg):
        if not cuda:  # said, not detected: DeepSpeed logs its detection of no GPU as a WARNING on every rank
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        disable_deepspeed_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return Runtime(rank, world, device, torch.bfloat16 if use_bf16 else None, deepspeed=True)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # broadcast_buffers=False: BatchNorm buffers are re-broadcast on every forward otherwise, which breaks the
    # second forward of a step (the PGD distortion runs f before the loss does).
    silence_broadcast_buffers_deprecation()
    accelerator = Accelerator(
        mixed_precision="no",
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        cpu=not cuda,
    )
    return Runtime(
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.device,
        torch.bfloat16 if use_bf16 else None,
        accelerator=accelerator,
    )


def disable_deepspeed_shm_build() -> None:
    """Skip DeepSpeed's shared-memory CPU all-reduce op unless asked (SEGUE_DS_SHM_COMM=1).

    On CPU, DeepSpeed compiles it with ninja on first use (minutes, and needs a compiler on every node);
    gloo's all-reduce is correct without it and fast enough for CPU rehearsals.
    """
    if os.environ.get("SEGUE_DS_SHM_COMM", "0") == "1" or torch.cuda.is_available():
        return
    import deepspeed.ops as ds_ops

    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False


class Runner:
    """One trainable model with its optimiser: DDP via Accelerate or a DeepSpeed engine, behind one interface.

    ``wrapped`` is what a forward that should synchronise gradients goes through (DDP wrapper or engine),
    ``module`` the plain model (frozen forwards, checkpoints, export), ``base_optimizer`` the torch optimiser
    (learning rate, state).
    """

    def __init__(
        self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, ds_config: dict | None
    ):
        self.name = name
        self.rt = rt
        if ds_config is not None:
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            self.wrapped: nn.Module = self.engine
            self.module: nn.Module = self.engine.module
        else:
            self.engine = None
            self.wrapped, self.optimizer = rt.accelerator.prepare(model, optimizer)
            self.module = unwrap_ddp(self.wrapped)
        self.base_optimizer = optimizer

    def backward_and_step(self, loss: torch.Tensor, grad_clip: float) -> None:
        """Back-propagate ``loss`` into this model and take one optimiser step (DeepSpeed clips by its own config)."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        self.rt.accelerator.backward(loss)
        self.step(grad_clip)

    def step(self, grad_clip: float) -> None:
        """DDP: clip the gradients already accumulated (``grad_clip`` > 0), step the optimiser, clear the gradients.

        Separate from the backward so that one backward can feed two models (the joint schedule).
        """
        if self.engine is not None:
            raise RuntimeError("a DeepSpeed engine steps inside backward_and_step: one engine per backward")
        if grad_clip > 0:
            self.rt.accelerator.clip_grad_norm_(self.wrapped.parameters(), grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The plain model inside the DDP wrapper that ``Accelerator.prepare`` puts around it (the model itself when there
    is none, as in one process).

    Not ``Accelerator.unwrap_model``: that imports DeepSpeed whenever it is installed (the test extra installs it),
    and DeepSpeed's import logs "[WARNING] Setting accelerator to CPU. If you have GPU or other accelerator, we were
    unable to detect it." on every rank of a CPU run that never uses DeepSpeed.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def ds_config_for(path: str, cfg: TrainConfig, rt: Runtime) -> dict:
    """Fill the DeepSpeed JSON's "auto" values from the training config."""
    with open(path, encoding="utf-8") as fh:
        ds = json.load(fh)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.data.batch_size * rt.world_size
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip
    bf16 = rt.autocast_dtype == torch.bfloat16
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    # We autocast ourselves; engines keep fp32 master weights on CPU where bf16 kernels are slow.
    if not torch.cuda.is_available():
        ds.setdefault("bf16", {})["enabled"] = False
        ds.setdefault("fp16", {})["enabled"] = False
    return ds


def to_float_images(images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """uint8 (B, 3, H, W) from the loader -> float32 in [0, 1] on this process's device (channels_last on CUDA)."""
    x = images.to(rt.device, non_blocking=True).float().div_(255.0)
    if rt.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def average_buffers(module: nn.Module, rt: Runtime) -> None:
    """Average BatchNorm running statistics across ranks (timm's `distribute_bn`).

    DDP runs with broadcast_buffers=False, so each rank's running stats follow its own data; f is used in eval
    mode during G epochs, and it must be the same function on every rank (and in a resumed run, which loads one
    copy of the buffers).
    """
    if rt.world_size == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            reduced = buf.detach().to(rt.comm_device, dtype=torch.float64)
            dist.all_reduce(reduced)
            buf.copy_(reduced.div_(rt.world_size).to(buf.device, buf.dtype))
