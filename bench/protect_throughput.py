"""Throughput of `segue protect` against the floor of decode + encode alone, and its memory as the corpus grows.

CPU mode (default, ~5 min on 2 cores)::

    .venv/bin/python bench/protect_throughput.py            # -> bench/results/protect_throughput_cpu.json

For 112 and 224 px synthetic faces stored as JPEG (q95, as `segue shards build` stores resized faces) and each
output format (PNG level 1, PNG level 0, JPEG q95) it measures, on the same images:

* ``floor``: decode + encode alone in a pool using every core (the best of a thread and a process pool): what any
  protect job must pay at least; ``floor_verify`` adds the decode of the written file that protect uses to check ε;
* ``protect``: the whole job (tar read, decode in loader workers, G, encode + verify, tar write) with the default
  generator (``configs/train/default.yaml``: width 16, 2 residual blocks), and ``protect_tiny_g`` with a width-8, 1-block G, which shows the
  pipeline's own overhead once G is cheap (as on a GPU);
* ``g_only``: G alone on the CPU (batches of 16 on every core, one intra-op thread each, bf16 where native: as
  protect runs it), the ceiling that G sets; also in fp32 and per image in fp32 (the path shard mode had before);
* the encode pool backend (threads vs processes) inside the pipeline;
* peak RSS (process tree) protecting 1k and 20k 64 px images: flat memory means streaming works.

GPU mode (for a lent GPU; the lead runs it)::

    python bench/protect_throughput.py --gpu                 # -> bench/results/gpu/protect_throughput_gpu.json

images/s per GPU at 224 and 112 px with JPEG and PNG output (goal >= 10,000 img/s at 224 px JPEG on a 16-core
host): G alone (bf16 and fp32, channels_last), the job with CPU codecs and with ``--gpu-codec`` (nvJPEG decode and
encode) and its phase timings, and the codec floors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import psutil
import torch
import webdataset as wds
from PIL import features

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segue_dist import protect  # noqa: E402
from segue_dist.config import load_config  # noqa: E402
from segue_dist.data.images import decode_image, encode_jpeg  # noqa: E402
from segue_dist.data.loader import iter_tar_samples  # noqa: E402
from segue_dist.data.synthetic import generate_corpus  # noqa: E402
from segue_dist.models.generator import SegueGenerator  # noqa: E402
from segue_dist.training.config import TrainConfig  # noqa: E402
from segue_dist.utils.device import cpus_per_process  # noqa: E402
from segue_dist.utils.io import atomic_write_json, read_json  # noqa: E402
from segue_dist.utils.progress import console, print_table  # noqa: E402
from segue_dist.weights import export_generator  # noqa: E402

RESULTS = REPO / "bench" / "results"
FORMATS: list[tuple[str, dict[str, Any]]] = [
    ("png1", {"format": "png", "png_level": 1}),
    ("png0", {"format": "png", "png_level": 0}),
    ("jpeg95", {"format": "jpeg", "jpeg_quality": 95}),
]


# ------------------------------------------------------------------------------------------------------------ data


def make_split(folder: Path, size: int, count: int, per_shard: int = 500, unique: int = 64) -> Path:
    """A shard set of ``count`` synthetic faces (``unique`` distinct renders cycled under new keys), JPEG q95."""
    if (folder / "sizes.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    renders = []
    for identity, index, img in generate_corpus(identities=8, per_identity=unique // 8, size=size):
        renders.append((identity, encode_jpeg(np.asarray(img), 95)))
        del index
    sizes = {}
    for shard_index, start in enumerate(range(0, count, per_shard)):
        name = f"{shard_index:05d}.tar"
        n = min(per_shard, count - start)
        with open(folder / name, "wb") as fh, wds.TarWriter(fh, mtime=0.0, encoder=False) as sink:
            for i in range(start, start + n):
                identity, data = renders[i % len(renders)]
                label = int(identity.split()[-1])
                meta = json.dumps({"identity": identity, "source": "synthetic"}).encode()
                sink.write({"__key__": f"{label:05d}_{i:07d}", "jpg": data, "cls": str(label).encode(), "json": meta})
        sizes[name] = n
    (folder / "labels.json").write_text(json.dumps({"labels": {f"Demo Person {i:02d}": i for i in range(8)}}))
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


def make_generator(folder: Path, width: int = 0, blocks: int = 0, train_size: int = 112) -> Path:
    """The default config's generator (``configs/train/default.yaml``; random weights: the cost does not depend on
    them), 8 classes, optionally narrower / shallower; ``train_size`` is recorded as its training size (folder mode
    computes δ at that short side)."""
    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "default.yaml")
    changes = {"num_classes": 8, "width": width or cfg.generator.width}
    changes["num_res_blocks"] = blocks or cfg.generator.num_res_blocks
    torch.manual_seed(0)
    generator = SegueGenerator(dataclasses.replace(cfg.generator, **changes))
    train_config = {"data": {"image_size": [train_size]}}
    return export_generator(generator, folder, label_map=None, label_source="cls", train_config=train_config)


def generator_shape(weights: Path) -> dict[str, int]:
    """Width and residual blocks of an exported generator (its generator.json)."""
    cfg = read_json(weights.parent / "generator.json")["generator"]
    return {"width": cfg["width"], "num_res_blocks": cfg["num_res_blocks"]}


def read_images(split: Path, limit: int) -> list[bytes]:
    out: list[bytes] = []
    for tar in sorted(split.glob("*.tar")):
        for raw in iter_tar_samples(str(tar)):
            out.append(raw["jpg"])
            if len(out) >= limit:
                return out
    return out


# ----------------------------------------------------------------------------------------------------------- floor


def _decode_encode(blobs: list[bytes], spec: protect.EncodeSpec, verify: bool) -> int:
    for blob in blobs:
        arr = np.asarray(decode_image(blob))
        data = protect.encode_image(arr, spec)
        if verify:
            np.asarray(decode_image(data))
    return len(blobs)


def floor_rate(
    blobs: list[bytes], spec: protect.EncodeSpec, pools: dict[str, Executor], verify: bool
) -> dict[str, float]:
    """images/s of decode + encode alone, per pool (threads and processes, as many as cores)."""
    chunks = [blobs[i : i + 16] for i in range(0, len(blobs), 16)]
    rates = {}
    for backend, pool in pools.items():
        workers = getattr(pool, "_max_workers", 1)
        list(pool.map(_decode_encode, chunks[:workers], [spec] * workers, [verify] * workers))  # warm up
        start = time.perf_counter()
        done = sum(pool.map(_decode_encode, chunks, [spec] * len(chunks), [verify] * len(chunks)))
        rates[backend] = done / (time.perf_counter() - start)
    return rates


def make_pools(workers: int) -> dict[str, Executor]:
    """One thread pool and one process pool for all floor measurements (spawning processes costs seconds)."""
    return {
        "thread": ThreadPoolExecutor(workers),
        "process": ProcessPoolExecutor(workers, mp_context=get_context("spawn")),
    }


# --------------------------------------------------------------------------------------------------------- protect


def protect_rate(generator: Path, split: Path, out: Path, **options: Any) -> dict[str, Any]:
    """Run the whole job in-process (a fresh --out) and return images/s and what it wrote."""
    shutil.rmtree(out, ignore_errors=True)  # a finished output would be skipped, not measured
    opts = protect.ProtectOptions(str(generator), str(split), str(out), progress=False, **options)
    start = time.perf_counter()
    summary, manifest = protect.protect(opts)
    seconds = time.perf_counter() - start
    assert manifest is not None and manifest["balanced"], manifest
    sizes = [p.stat().st_size for p in out.glob("*.tar")]
    return {
        "img_s": summary.written / seconds,
        "images": summary.written,
        "seconds": round(seconds, 2),
        "kb_per_image": round(sum(sizes) / 1024 / max(summary.written, 1), 1),
        "measured_max_abs": manifest["measured_max_abs"],
        "eps_bound_holds": manifest["eps_bound_holds"],
        "psnr_mean": manifest["psnr_mean"],
        "timings": summary.timings,
    }


def g_only_rate(
    generator_dir: Path,
    size: int,
    device: str,
    batch: int,
    count: int,
    precision: str = "auto",
    per_image: bool = False,
) -> float:
    """images/s of G alone (quantised, no codecs), run as protect runs it: on CUDA batches from the main thread; on
    the CPU batches of ``batch`` on ``cores`` threads of one intra-op thread each (``per_image``: one image per
    forward in fp32, the path shard mode took before it was batched)."""
    from segue_dist.weights import load_generator

    generator, _ = load_generator(generator_dir, device)
    perturber = protect.Perturber(generator, torch.device(device), 8, "fp32" if per_image else precision)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)  # NHWC, as protect feeds it
    y = torch.randint(0, 8, (batch,), device=device)
    if device == "cuda":
        perturber(x, y)  # warm-up (cuDNN algorithm choice, allocator)
        torch.cuda.synchronize()
        start, done = time.perf_counter(), 0
        while done < count:
            perturber(x, y)
            done += batch
        torch.cuda.synchronize()
        return done / (time.perf_counter() - start)

    def one_batch(_: int) -> int:
        if per_image:
            for i in range(batch):
                perturber(x[i : i + 1], y[i : i + 1])
        else:
            perturber(x, y)
        return batch

    cores = cpus_per_process()
    pool = protect.make_thread_pool(cores, "g-only")
    try:
        list(pool.map(one_batch, range(cores)))  # warm-up (oneDNN primitive cache)
        start = time.perf_counter()
        done = sum(pool.map(one_batch, range(max(cores, count // batch))))
        return done / (time.perf_counter() - start)
    finally:
        pool.shutdown()


def checkout_rate(checkout: Path, generator: Path, split: Path, out: Path, **options: Any) -> dict[str, Any]:
    """The whole job as a user runs it (``python -m segue_dist.protect`` in a fresh process, wall time including
    start-up) from the source tree ``checkout``: the same measurement for this tree and an older one."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "segue_dist.protect", "--generator", str(generator), "--in", str(split)]
    cmd += ["--out", str(out), "--no-progress", "--device", "cpu"]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    images = sum(read_json(p)["written"] for p in out.glob("*._stats.json"))
    return {"img_s": round(images / seconds, 1), "images": images, "seconds": round(seconds, 2)}


def compare_checkouts(work: Path, generator: Path, other: Path, quick: bool) -> dict[str, Any]:
    """This tree against ``other`` (e.g. ``git archive 430435f``: shard mode's per-image fp32 G) back to back on
    the same splits and load: 112 and 224 px, PNG level 1, the default G."""
    rows, out = [], {"other_checkout": str(other)}
    for size, count in ((112, 320 if quick else 960), (224, 96 if quick else 320)):
        split = make_split(work / f"in{size}_cmp{count}", size, count)
        new = checkout_rate(REPO, generator, split, work / f"out_cmp_new_{size}", format="png")
        old = checkout_rate(other, generator, split, work / f"out_cmp_old_{size}", format="png")
        speedup = round(new["img_s"] / old["img_s"], 2) if "img_s" in new and "img_s" in old else None
        out[f"{size}px_png1"] = {"this_tree": new, "other_tree": old, "speedup": speedup}
        rows.append([f"{size} px png1", str(new.get("img_s")), str(old.get("img_s")), str(speedup)])
    print_table("whole job, fresh process (img/s): this tree vs the other", ["setting", "this", "other", "x"], rows)
    return out


# ------------------------------------------------------------------------------------------------------------- RSS


def peak_rss(generator: Path, split: Path, out: Path) -> dict[str, float]:
    """Peak memory (MiB) of a protect process: RSS of the main process, RSS of its tree (loader workers share the
    parent's pages after fork, so this sum over-counts) and USS of the tree (memory private to each process: the
    honest total), sampled every 0.25 s."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "segue_dist.protect", "--generator", str(generator), "--in", str(split)]
    cmd += ["--out", str(out), "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    main = psutil.Process(proc.pid)
    peaks = {"main_rss": 0, "tree_rss": 0, "tree_uss": 0}
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            procs = [main, *main.children(recursive=True)]
            full = [p.memory_full_info() for p in procs]
        except psutil.Error:
            time.sleep(0.05)
            continue
        peaks["main_rss"] = max(peaks["main_rss"], full[0].rss)
        peaks["tree_rss"] = max(peaks["tree_rss"], sum(f.rss for f in full))
        peaks["tree_uss"] = max(peaks["tree_uss"], sum(f.uss for f in full))
        time.sleep(0.25)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"protect failed: {err[-2000:]}")
    result = {f"peak_{k}_mib": round(v / 2**20, 1) for k, v in peaks.items()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# ---------------------------------------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": cpus_per_process(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "zlib": features.version("zlib"),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(path: Path, results: dict[str, Any]) -> None:
    results["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    atomic_write_json(path, results)
    console.print(f"results written to {path}")


# ------------------------------------------------------------------------------------------------------------- CPU


def run_cpu(work: Path, quick: bool, compare_with: Path | None = None) -> dict[str, Any]:
    cores = cpus_per_process()
    full_g = make_generator(work / "g_full")
    tiny_g = make_generator(work / "g_tiny", 8, 1)
    counts = {112: 160, 224: 64} if quick else {112: 960, 224: 320}
    tiny_counts = {112: 800, 224: 320} if quick else {112: 1600, 224: 640}
    rows, settings = [], []
    pools = make_pools(cores)
    for size in (112, 224):
        split = make_split(work / f"in{size}", size, tiny_counts[size])
        blobs = read_images(split, tiny_counts[size])
        g_only = g_only_rate(full_g.parent, size, "cpu", 16, 4 * counts[size])
        g_only_fp32 = g_only_rate(full_g.parent, size, "cpu", 16, 4 * counts[size], precision="fp32")
        g_only_per_image = g_only_rate(full_g.parent, size, "cpu", 16, 2 * counts[size], per_image=True)
        for label, fmt in FORMATS:
            spec = protect.EncodeSpec(
                fmt["format"], fmt.get("png_level", 1), fmt.get("jpeg_quality", 95), protect.eps_levels(8 / 255)
            )
            floor = floor_rate(blobs, spec, pools, verify=False)
            floor_verify = floor_rate(blobs, spec, pools, verify=True)
            small = make_split(work / f"in{size}_{counts[size]}", size, counts[size])
            full = protect_rate(full_g, small, work / f"out_{size}_{label}_full", **fmt)
            tiny = protect_rate(tiny_g, split, work / f"out_{size}_{label}_tiny", **fmt)
            best_floor = max(floor.values())
            entry = {
                "size": size,
                "output": label,
                **fmt,
                "floor_img_s": round(best_floor, 1),
                "floor_thread_img_s": round(floor["thread"], 1),
                "floor_process_img_s": round(floor["process"], 1),
                "floor_verify_img_s": round(max(floor_verify.values()), 1),
                "g_only_img_s": round(g_only, 1),
                "g_only_fp32_img_s": round(g_only_fp32, 1),
                "g_only_per_image_fp32_img_s": round(g_only_per_image, 1),
                "protect_vs_min_floor_g": round(full["img_s"] / min(best_floor, g_only), 3),
                "protect": {**full, "img_s": round(full["img_s"], 1)},
                "protect_tiny_g": {**tiny, "img_s": round(tiny["img_s"], 1)},
                "protect_vs_floor": round(full["img_s"] / best_floor, 3),
                "protect_tiny_g_vs_floor": round(tiny["img_s"] / best_floor, 3),
            }
            settings.append(entry)
            rows.append(
                [
                    f"{size} px {label}",
                    f"{best_floor:,.0f}",
                    f"{entry['floor_verify_img_s']:,.0f}",
                    f"{g_only:,.1f}",
                    f"{full['img_s']:,.1f} ({entry['protect_vs_floor']:.0%})",
                    f"{tiny['img_s']:,.0f} ({entry['protect_tiny_g_vs_floor']:.0%})",
                    f"{full['kb_per_image']:.0f}",
                    str(full["measured_max_abs"]),
                ]
            )
    for pool in pools.values():
        pool.shutdown()
    print_table(
        f"segue protect on CPU ({cores} cores), images/s",
        ["setting", "floor", "floor+verify", "G only", "protect (vs floor)", "tiny G (vs floor)", "KB/img", "max|δ|"],
        rows,
    )
    backends = compare_backends(work, tiny_g, quick)
    rss = {}
    for count in (1000, 20000):
        split = make_split(work / f"in64_{count}", 64, count, per_shard=1000)
        rss[str(count)] = peak_rss(tiny_g, split, work / f"out64_{count}")
    print_table(
        "peak RSS protecting 64 px images (tiny G, PNG level 1)",
        ["images", "main RSS MiB", "tree RSS MiB", "tree USS MiB", "seconds"],
        [
            [
                k,
                str(v["peak_main_rss_mib"]),
                str(v["peak_tree_rss_mib"]),
                str(v["peak_tree_uss_mib"]),
                str(v["seconds"]),
            ]
            for k, v in rss.items()
        ],
    )
    compared = compare_checkouts(work, full_g, compare_with, quick) if compare_with else None
    return {
        "mode": "cpu",
        "compute": f"cpu-{'bf16' if protect.cpu_has_bf16() else 'fp32'}-batch",
        "batched_vs_other_checkout": compared,
        "generator_full": {"config": "configs/train/default.yaml", **generator_shape(full_g)},
        "generator_tiny": {"width": 8, "num_res_blocks": 1},
        "input": "synthetic faces, JPEG q95",
        "settings": settings,
        "encode_backend": backends,
        "rss_64px": rss,
        "notes": [
            "floor = decode + encode alone over every core; floor_verify adds protect's decode of the written file",
            "protect uses the default G; protect_tiny_g a width-8, 1-block G to expose the pipeline's own overhead",
            "on CPU, G bounds the job: compare protect with g_only (G batched, bf16 where native, one intra-op "
            "thread per batch on every core, as protect runs it); g_only_per_image_fp32 is the old per-image path",
            "protect_vs_min_floor_g: protect / min(floor, g_only), the issue's 80% goal",
        ],
    }


def compare_backends(work: Path, tiny_g: Path, quick: bool) -> dict[str, Any]:
    """The encode pool inside the pipeline: threads (PIL releases the GIL while compressing) vs processes."""
    split = work / "in112"
    out: dict[str, Any] = {}
    for label, fmt in (FORMATS[0], FORMATS[2]):
        for backend in ("thread", "process"):
            result = protect_rate(tiny_g, split, work / f"out_backend_{label}_{backend}", encode_backend=backend, **fmt)
            out[f"112px_{label}_{backend}_img_s"] = round(result["img_s"], 1)
    print_table(
        "encode pool backend inside protect (112 px, tiny G), images/s",
        ["setting", "img/s"],
        [[k, f"{v:,.0f}"] for k, v in out.items()],
    )
    return out


# ------------------------------------------------------------------------------------------------------------- GPU


def run_gpu(
    work: Path, count: int, out_path: Path, budget_s: float, sizes: tuple[int, ...] = (224, 112)
) -> dict[str, Any]:
    """Per size: G alone (bf16 and fp32), the codec floors (CPU and nvJPEG) and the whole job with JPEG and PNG
    output, CPU codecs and ``--gpu-codec``, each with its phase timings (where the time goes). Each step saves the
    results so far, and steps past ``budget_s`` are skipped: a lent GPU's time is short."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    deadline = time.monotonic() + budget_s
    results: dict[str, Any] = {"mode": "gpu", "images": count, "sizes": {}}
    results["machine"] = machine_info()

    def save() -> None:
        atomic_write_json(out_path, results)

    full_g = make_generator(work / "g_full")
    results["generator"] = {"config": "configs/train/default.yaml", **generator_shape(full_g)}
    cores = cpus_per_process()
    rows = []
    for size in sizes:
        if time.monotonic() > deadline:
            results["sizes"][str(size)] = {"error": "skipped: out of time"}
            continue
        row: dict[str, Any] = {}
        results["sizes"][str(size)] = row
        split = make_split(work / f"in{size}", size, count, per_shard=1000)
        row["g_only_bf16_img_s"] = round(g_only_rate(full_g.parent, size, "cuda", 256, 40 * 256), 1)
        row["g_only_fp32_img_s"] = round(g_only_rate(full_g.parent, size, "cuda", 256, 20 * 256, "fp32"), 1)
        save()
        blobs = read_images(split, 4000)
        jpeg = protect.EncodeSpec("jpeg", 1, 95, 8)
        pools = make_pools(cores)
        row["cpu_floor_jpeg95_img_s"] = {k: round(v, 1) for k, v in floor_rate(blobs, jpeg, pools, False).items()}
        for pool in pools.values():
            pool.shutdown()
        row["gpu_codec_floor_img_s"] = gpu_codec_floor(blobs)
        save()
        runs: dict[str, Any] = {}
        row["protect"] = runs
        variants: list[tuple[str, dict[str, Any]]] = [
            ("jpeg95_gpu_codec", {"format": "jpeg", "gpu_codec": True}),
            ("jpeg95_cpu_codecs", {"format": "jpeg"}),
            ("jpeg95_cpu_codecs_process_pool", {"format": "jpeg", "encode_backend": "process"}),
            ("png0_gpu_decode", {"format": "png", "png_level": 0, "gpu_codec": True}),
            ("png1_cpu_codecs", {"format": "png", "png_level": 1}),
        ]
        for label, options in variants:
            if time.monotonic() > deadline:
                runs[label] = {"error": "skipped: out of time"}
                continue
            runs[label] = gpu_protect_run(full_g, split, work / f"out_{size}_{label}", count, options)
            save()
        rows += [[f"{size} px G only (bf16)", f"{row['g_only_bf16_img_s']:,.0f}", "", "", ""]]
        rows += [[f"{size} px CPU JPEG floor", str(row["cpu_floor_jpeg95_img_s"]), "", "", ""]]
        rows += [[f"{size} px nvJPEG floor", str(row["gpu_codec_floor_img_s"])[:60], "", "", ""]]
        rows += [
            [
                f"{size} px {k}",
                f"{v['img_s']:,.0f}" if "img_s" in v else v["error"][:60],
                str(v.get("img_s_after_startup", "")),
                str(v.get("measured_max_abs", "")),
                json.dumps(v.get("timings", {})),
            ]
            for k, v in runs.items()
        ]
    results["determinism"] = gpu_determinism(full_g, work, deadline)
    save()
    print_table(
        f"segue protect on {torch.cuda.get_device_name(0)}, images/s per GPU",
        ["setting", "img/s", "after start-up", "max|δ|", "seconds per phase"],
        rows,
    )
    return results


def gpu_protect_run(generator: Path, split: Path, out: Path, count: int, options: dict[str, Any]) -> dict[str, Any]:
    """One whole job on the GPU, then a rerun over its finished output (everything but the shards: the start-up
    cost); errors are reported, never raised, so one failing mode does not lose the others."""
    try:
        run = protect_rate(generator, split, out, device="cuda", **options)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        start = time.perf_counter()
        protect.protect(
            protect.ProtectOptions(str(generator), str(split), str(out), progress=False, device="cuda", **options)
        )
        startup = time.perf_counter() - start
        run["startup_s"] = round(startup, 2)
        run["img_s_after_startup"] = round(count / max(run["seconds"] - startup, 1e-9), 1)
    except Exception as exc:  # noqa: BLE001
        run["startup_error"] = f"{type(exc).__name__}: {exc}"
    return run


def gpu_determinism(generator: Path, work: Path, deadline: float) -> dict[str, Any]:
    """Two runs of 2,000 images with different loader and encode worker counts must give identical bytes."""
    if time.monotonic() > deadline:
        return {"error": "skipped: out of time"}
    split = make_split(work / "in224_small", 224, 2000, per_shard=250)
    outs = []
    for i, (workers, encoders) in enumerate(((1, 2), (4, 7))):
        out = work / f"out_det_{i}"
        protect_rate(generator, split, out, device="cuda", format="png", workers=workers, encode_workers=encoders)
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))})
    manifest = json.loads((work / "out_det_0" / protect.MANIFEST_NAME).read_text())
    return {"identical_bytes": outs[0] == outs[1], "eps_bound_holds": manifest["eps_bound_holds"]}


def gpu_codec_floor(blobs: list[bytes], batch: int = 256) -> float | str:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decode_jpeg(tensors[:batch], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(tensors), batch):
            images = decode_jpeg(tensors[i : i + batch], mode=ImageReadMode.RGB, device="cuda")
            encoded = encode_jpeg(images, quality=95)
            [e.cpu() for e in encoded]
        torch.cuda.synchronize()
        return round(len(tensors) / (time.perf_counter() - start), 1)
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="GPU mode: images/s per GPU at 224 and 112 px")
    parser.add_argument("--gpu-images", type=int, default=20000)
    parser.add_argument("--gpu-budget-s", type=float, default=400, help="GPU mode: skip steps after this long")
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--compare-with", metavar="DIR", help="CPU: also run the whole job from this source tree (an older commit)"
    )
    parser.add_argument(
        "--compare-only",
        action="store_true",
        help="CPU: only the --compare-with rows, merged into the existing results JSON (with their own load)",
    )
    parser.add_argument("--out", help="results JSON (default bench/results/[gpu/]protect_throughput_{cpu,gpu}.json)")
    args = parser.parse_args()
    mode = "gpu" if args.gpu else "cpu"
    out_path = (
        Path(args.out) if args.out else RESULTS / ("gpu/" if args.gpu else "") / f"protect_throughput_{mode}.json"
    )
    with tempfile.TemporaryDirectory(prefix="protect_bench_") as tmp:
        work = Path(args.work or tmp)
        if args.compare_only:
            if not args.compare_with:
                raise SystemExit("--compare-only needs --compare-with")
            results = read_json(out_path)
            compared = compare_checkouts(work, make_generator(work / "g_full"), Path(args.compare_with), args.quick)
            compared["load_average"] = [round(v, 2) for v in os.getloadavg()]
            compared["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
            results["batched_vs_other_checkout"] = compared
            atomic_write_json(out_path, results)
            return 0
        if args.gpu:
            results = run_gpu(work, args.gpu_images, out_path, args.gpu_budget_s)
        else:
            info = machine_info()
            results = run_cpu(work, args.quick, Path(args.compare_with) if args.compare_with else None)
            results["machine"] = info
        write_results(out_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
