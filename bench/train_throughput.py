"""Training throughput: the G step and the f step fed by the WebDataset loader vs fed from memory.

The loader must not be the bottleneck: loader-fed samples/s should be >= 90% of the in-memory rate.

    python bench/train_throughput.py --shards shards/glint24_64/train --size 64 --out bench/results/train_throughput_cpu.json
    python bench/train_throughput.py --shards ... --size 224 --device cuda      (bf16 autocast, channels_last)

G, the surrogate and the distortion layer come from a training config (default: configs/train/default.yaml, plus
any trailing ``key=value`` overrides), so the steps timed are the ones `segue train` runs.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import torch

from segue_dist.config import load_config, to_dict
from segue_dist.data.loader import TrainStream, open_shard_set, train_loader
from segue_dist.distortion import DistortionLayer
from segue_dist.train import Runtime, TrainConfig, build_models, f_step, g_step
from segue_dist.utils.io import atomic_write_json
from segue_dist.utils.progress import print_table


class PlainRunner:
    """Single-process stand-in for train.Runner: the same step functions, no DDP wrapper."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float) -> None:
        self.name = name
        self.wrapped = self.module = model
        self.optimizer = self.base_optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def backward_and_step(self, loss: torch.Tensor, grad_clip: float) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_steps(step_fn, batches, steps: int, warmup: int, device: torch.device) -> float:
    """samples/s over ``steps`` steps after ``warmup``; batches is an iterator of (uint8 images, labels)."""
    count, start = 0, 0.0
    for i, (images, labels, *_) in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x = images.to(device, non_blocking=True).float().div_(255.0)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        step_fn(x, labels.to(device, non_blocking=True))
        if i >= warmup:
            count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="a training split folder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/train_throughput_cpu.json")
    parser.add_argument("--config", default="configs/train/default.yaml", help="training config: G, f, distortion")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    args = parser.parse_args()

    device = torch.device(args.device)
    shard_set = open_shard_set(args.shards)
    k = shard_set.num_classes
    cfg = load_config(TrainConfig, args.config, [*args.overrides, f"data.image_size=[{args.size}]"])
    generator, surrogate = build_models(cfg, k)
    generator, surrogate = generator.to(device), surrogate.to(device)
    if device.type == "cuda":
        generator = generator.to(memory_format=torch.channels_last)
        surrogate = surrogate.to(memory_format=torch.channels_last)
    rt = Runtime(0, 1, device, torch.bfloat16 if device.type == "cuda" else None)
    g, f = PlainRunner("g", generator, 5e-4), PlainRunner("f", surrogate, 5e-4)
    distortion = DistortionLayer(cfg.distortion).to(device)
    rng = torch.Generator().manual_seed(0)

    def f_fn(x, y):
        f_step(g, f, x, y, cfg, rt)

    def g_fn(x, y):
        g_step(g, f, distortion, x, y, cfg, rt, rng)

    total = args.warmup + args.steps
    stream = TrainStream(shard_set, batch_size=args.batch_size, batches_per_epoch=total, image_size=args.size, seed=0)
    memory = [b[:2] for b in train_loader(stream, num_workers=0)]
    results = {}
    for name, fn in (("f_step", f_fn), ("g_step", g_fn)):
        in_memory = run_steps(fn, iter(memory), args.steps, args.warmup, device)
        stream.set_epoch(1)
        loader = iter(train_loader(stream, num_workers=args.workers))
        fed = run_steps(fn, loader, args.steps, args.warmup, device)
        results[name] = {"in_memory_samples_per_s": in_memory, "loader_samples_per_s": fed, "ratio": fed / in_memory}
    record = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "size": args.size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "steps": args.steps,
        "config": args.config,
        "generator": to_dict(generator.config),  # with K from the shards
        "surrogate": to_dict(cfg.surrogate),
        "small_stem": bool(getattr(surrogate, "small_stem", False)),
        "distortion": to_dict(cfg.distortion),
        "results": results,
        "goal": "loader-fed >= 90% of in-memory",
        "goal_met": all(r["ratio"] >= 0.9 for r in results.values()),
    }
    atomic_write_json(args.out, record)
    rows = [
        [name, f"{r['in_memory_samples_per_s']:.1f}", f"{r['loader_samples_per_s']:.1f}", f"{r['ratio']:.0%}"]
        for name, r in results.items()
    ]
    print_table(f"train throughput, {args.size} px, {device.type}", ["step", "in memory", "loader", "ratio"], rows)
    print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
