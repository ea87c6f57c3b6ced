"""Folder-mode `segue protect` against the floor of the codecs alone, at 224 and 1024 px, and its memory.

    .venv/bin/python bench/protect_folder_throughput.py          # -> bench/results/protect_folder_throughput_cpu.json
    .venv/bin/python bench/protect_folder_throughput.py --quick  # fewer photos (~3 min on 2 cores)

Photos: LFW faces from ``$SEGUE_FACES/lfw423`` (synthetic faces when absent) resized to 224 and 1024 px with mild
sensor noise (sigma 2 levels, so the upscaled 1024 px photos cost the JPEG codec what a real photo does), written as
JPEG q95 in 8 identity folders: what a platform's photo folder looks like. Every run uses the same files.

Rows, each as images/s on this machine (all cores):

* ``floor``: read + decode + encode (JPEG q95, 4:4:4, as protect writes it) + atomic write (temp + rename, as
  protect writes photos), in a thread pool of
  one thread per core: what any folder-mode job pays at least. ``floor_verify`` adds one more decode of the written
  bytes, the check protect makes on every file (ε measured on what was written);
* ``protect``: the whole job (``FolderProtector``: list, label, decode, G batched per chunk, upsample, quantise,
  encode, verify, atomic write, journal, manifest) with the default generator (``configs/train/default.yaml``,
  random weights: the cost does not depend on them) at face size 64 and 112 px (δ computed at that short side);
* ``g_only``: G alone at the face size, batched as folder mode runs it (bf16 where the CPU has it): the ceiling
  G sets;
* peak RSS of the job (a subprocess) at two corpus sizes: flat means memory does not grow with the number of photos.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protect_throughput import machine_info, make_generator, write_results  # noqa: E402

from segue_dist import protect  # noqa: E402
from segue_dist.data.synthetic import generate_corpus  # noqa: E402
from segue_dist.protect.photo import encode_photo, open_photo  # noqa: E402
from segue_dist.utils.device import cpus_per_process  # noqa: E402
from segue_dist.utils.io import atomic_write_bytes  # noqa: E402
from segue_dist.utils.progress import console, print_table  # noqa: E402
from segue_dist.weights import load_generator  # noqa: E402

RESULTS = REPO / "bench" / "results"
IDENTITIES = 8
JPEG_QUALITY = 95


def source_faces(count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct face photos as (H, W, 3) uint8: LFW when present, else the synthetic demo faces."""
    faces_root = Path(os.environ.get("SEGUE_FACES", REPO.parent / "shared" / "data")) / "lfw423"
    if faces_root.is_dir():
        files = sorted(faces_root.glob("*/*.jpg"))
        pick = np.random.default_rng(seed).choice(len(files), size=min(count, len(files)), replace=False)
        return [np.asarray(Image.open(files[i]).convert("RGB")) for i in sorted(pick)]
    return [np.asarray(img) for _, _, img in generate_corpus(IDENTITIES, -(-count // IDENTITIES), 250, seed)][:count]


def make_photo_folder(folder: Path, size: int, count: int, unique: int = 64, seed: int = 0) -> Path:
    """``count`` JPEG photos at ``size`` px in identity folders (``unique`` distinct ones, cycled under new names)."""
    marker = folder.with_name(folder.name + ".complete")  # beside the folder: inside it would count as ignored
    if marker.is_file():
        return folder
    rng = np.random.default_rng(seed)
    blobs = []
    for face in source_faces(unique, seed):
        big = np.asarray(Image.fromarray(face).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        noisy = np.clip(big + rng.normal(0, 2.0, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=JPEG_QUALITY)
        blobs.append(buf.getvalue())
    for i in range(count):
        atomic_write_bytes(folder / f"id{i % IDENTITIES:02d}" / f"photo_{i:06d}.jpg", blobs[i % len(blobs)])
    marker.write_text("ok\n")
    return folder


def photo_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("id*/*.jpg"))


# ------------------------------------------------------------------------------------------------------------ floor


def _codec_round_trip(paths: list[Path], out: Path, verify: bool) -> int:
    spec = protect.PhotoFormat(1, JPEG_QUALITY, 8)
    for path in paths:
        img, fmt = open_photo(path.read_bytes(), 4096 * 4096)
        data = encode_photo(img, fmt, spec)
        if verify:
            Image.open(io.BytesIO(data)).load()
        atomic_write_bytes(out / path.parent.name / path.name, data, durable=False)  # as protect writes photos
    return len(paths)


def floor_rate(folder: Path, out: Path, workers: int, verify: bool) -> float:
    """images/s of read + decode + encode (+ verify decode) + atomic write, ``workers`` threads."""
    paths = photo_files(folder)
    chunks = [paths[i : i + 16] for i in range(0, len(paths), 16)]
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        list(pool.map(_codec_round_trip, chunks[:workers], [out] * workers, [verify] * workers))  # warm-up
        start = time.perf_counter()
        done = sum(pool.map(_codec_round_trip, chunks, [out] * len(chunks), [verify] * len(chunks)))
    shutil.rmtree(out, ignore_errors=True)
    return done / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------- protect


def protect_rate(generator: Path, folder: Path, out: Path, face_size: int, device: str) -> dict[str, Any]:
    """Run the whole folder job in-process on a fresh --out; images/s over the job's own wall time."""
    shutil.rmtree(out, ignore_errors=True)
    opts = protect.ProtectOptions(
        str(generator), str(folder), str(out), progress=False, face_size=face_size, device=device
    )
    start = time.perf_counter()
    summary, manifest, _ = protect.protect_folder(opts)
    seconds = time.perf_counter() - start
    assert manifest is not None and manifest["balanced"], manifest
    written = summary.count("written")
    jpeg = manifest["formats"]["JPEG"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "img_s": round(written / seconds, 2),
        "photos": written,
        "seconds": round(seconds, 2),
        "measured_max_abs": jpeg["max_abs_delta"],
        "psnr_mean": jpeg["psnr_mean"],
    }


def g_only_rate(generator: Path, face_size: int, batch: int, count: int, device: str) -> float:
    """images/s of G alone on (batch, face, face, 3) uint8 faces: batched on one thread per core on CPU, bf16
    batches on CUDA (synchronised at the end)."""
    model, _ = load_generator(generator, device)
    perturber = protect.Perturber(model, torch.device(device), 8)  # as both modes run G (--precision auto)
    workers = 1 if device.startswith("cuda") else cpus_per_process()
    faces = torch.randint(0, 256, (batch, face_size, face_size, 3), dtype=torch.uint8)
    labels = torch.arange(batch) % 8

    def run(n: int) -> int:
        for _ in range(n):
            perturber.deltas(faces, labels)
        return n * batch

    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        run(1)
        per_worker = max(1, count // (batch * workers))
        start = time.perf_counter()
        done = sum(pool.map(run, [per_worker] * workers))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def peak_rss_mb(generator: Path, folder: Path, out: Path) -> float:
    """Peak RSS (MB) of `segue protect` on ``folder`` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import resource, sys; from segue_dist import protect; "
        "sys.exit(protect.main(['--generator', sys.argv[1], '--in', sys.argv[2], '--out', sys.argv[3], "
        "'--no-progress', '--face-size', '64'])) "
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [sys.executable, "-c", code, str(generator), str(folder), str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(out, ignore_errors=True)
    # ru_maxrss of children is the maximum over every child so far: measure the small corpus first.
    return round(max(peak, before) / 1024, 1)


# ------------------------------------------------------------------------------------------------------------- main


def run(work: Path, quick: bool, device: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    workers = cpus_per_process()
    counts = {224: 400 if quick else 1600, 1024: 48 if quick else 192}
    if device.startswith("cuda"):
        counts = {224: 4096 if quick else 16384, 1024: 256 if quick else 1024}
    results: dict[str, Any] = {"machine": machine_info(), "device": device, "workers": workers, "quick": quick}
    results["sizes"] = {}
    generators = {face: make_generator(work / f"gen_{face}", train_size=face) for face in (64, 112)}
    rows = []
    for size, count in counts.items():
        folder = make_photo_folder(work / f"photos_{size}", size, count)
        row: dict[str, Any] = {"photos": count}
        row["floor_img_s"] = round(floor_rate(folder, work / "floor_out", workers, verify=False), 2)
        row["floor_verify_img_s"] = round(floor_rate(folder, work / "floor_out", workers, verify=True), 2)
        for face, generator in generators.items():
            job = protect_rate(generator, folder, work / "protect_out", face, device)
            job["of_floor"] = round(job["img_s"] / row["floor_img_s"], 3)
            job["of_floor_verify"] = round(job["img_s"] / row["floor_verify_img_s"], 3)
            batch = 256 if device.startswith("cuda") else 16
            job["g_only_img_s"] = round(g_only_rate(generator, face, batch, 64 * batch, device), 1)
            row[f"protect_face{face}"] = job
            rows.append([f"{size} px, face {face}", f"{row['floor_img_s']:.1f}", f"{row['floor_verify_img_s']:.1f}",
                         f"{job['img_s']:.1f}", f"{100 * job['of_floor']:.0f}%", f"{job['g_only_img_s']:.0f}"])  # fmt: skip
        results["sizes"][str(size)] = row
    small, large = (200, 800) if quick else (400, 1600)
    results["peak_rss_mb"] = {
        str(n): peak_rss_mb(generators[64], make_photo_folder(work / f"rss_{n}", 224, n), work / "rss_out")
        for n in (small, large)
    }
    print_table(
        "folder mode, JPEG q95 in and out (images/s)",
        ["photos", "floor", "floor + verify", "protect", "of floor", "G only"],
        rows,
    )
    console.print(f"peak RSS (224 px photos): {results['peak_rss_mb']}")
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer photos (about 3 minutes on 2 cores)")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (G on the GPU; codecs on the CPU threads)")
    p.add_argument("--out", default="", help="result JSON (default bench/results/protect_folder_throughput_<dev>.json)")
    args = p.parse_args()
    if not args.out:
        dev = "gpu" if args.device.startswith("cuda") else "cpu"
        args.out = str(RESULTS / ("gpu" if dev == "gpu" else "") / f"protect_folder_throughput_{dev}.json")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="segue_folder_bench_"))
    try:
        write_results(Path(args.out), run(work, args.quick, args.device))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
