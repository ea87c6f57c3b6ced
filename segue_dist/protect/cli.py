"""`segue protect` / `python -m segue_dist.protect`: arguments, the run, and the summary tables it prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from segue_dist.protect.folder_mode import FolderSummary, is_folder_input, protect_folder
from segue_dist.protect.manifest import QUARANTINE_NAME, finalize_if_complete
from segue_dist.protect.options import ProtectOptions
from segue_dist.protect.shard_mode import Protector, RankSummary
from segue_dist.utils.progress import console, print_table
from segue_dist.utils.seed import seed_everything


def print_rank_summary(summary: RankSummary) -> None:
    stats = summary.stats
    written = summary.written
    rate = written / summary.seconds if summary.seconds > 0 else 0.0
    rows = [
        [
            f"{summary.rank}/{summary.world_size}",
            f"{len(stats)}+{summary.shards_skipped}",
            str(written),
            str(summary.quarantined),
            str(max((s["max_abs_delta"] for s in stats if s["written"]), default=0)),
            f"{sum(s['mean_abs_delta'] * s['written'] for s in stats) / max(written, 1):.2f}",
            f"{sum(s['psnr_mean'] * s['written'] for s in stats) / max(written, 1):.2f}",
            f"{rate:,.1f}",
        ]
    ]
    if summary.timings:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(summary.timings.items(), key=lambda kv: -kv[1]))
        console.print(f"main thread: {phases} of {summary.seconds:.1f}s")
    print_table(
        "segue protect: this rank (shards done now + earlier; |δ| in 1/255)",
        ["rank", "shards", "written", "quar.", "max|δ|", "mean|δ|", "PSNR", "img/s"],
        rows,
    )


def print_manifest(manifest: dict[str, Any]) -> None:
    bound = manifest["eps_bound_holds"]
    bound_text = "n/a (lossy: measured)" if bound is None else ("holds" if bound else "VIOLATED")
    rows = [
        ["shards", str(manifest["shards"])],
        ["samples in", str(manifest["samples_in"])],
        ["samples out", str(manifest["samples_out"])],
        ["quarantined", str(manifest["quarantined"])],
        ["balanced", "yes" if manifest["balanced"] else "NO"],
        [f"ε bound ({manifest['eps_levels']} levels)", bound_text],
        ["max |δ| (levels)", str(manifest["measured_max_abs"])],
        ["mean |δ| (levels)", f"{manifest['mean_abs_delta']:.2f}"],
        ["PSNR (dB)", f"{manifest['psnr_mean']:.2f}"],
    ]
    print_table("segue protect", ["", "value"], rows, path=manifest["output"])
    for q in manifest["quarantined_samples"][:20]:
        console.print(f"  quarantined {q['shard']} {q['key']}: {q['reason']}")
    if manifest["quarantined"] > 20:
        console.print(f"  ... {manifest['quarantined'] - 20} more in {QUARANTINE_NAME}")
    for e in manifest["shard_errors"]:
        console.print(f"  [red]shard error[/red] {e['shard']}: {e['reason']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, metavar="PATH", help="exported generator (.safetensors or dir)")
    parser.add_argument(
        "--in",
        dest="inp",
        required=True,
        metavar="DIR",
        help="input: a shard split (shards/lfw62/train) or a photo folder",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must differ from --in)")
    parser.add_argument(
        "--input-format",
        choices=["auto", "shards", "folder"],
        default="auto",
        help="auto: folder mode when --in has no sizes.json and no .tar shards (auto). Folder mode writes every "
        "photo at the same relative path, size, format (JPEG at --jpeg-quality, others lossless), mode (gray stays "
        "gray, alpha kept) and upright; METADATA (EXIF incl. GPS, ICC, XMP) IS DROPPED unless --keep-metadata",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        help="shards: pseudo-label sidecar (key -> label) instead of .cls; folder: CSV/JSON relative path -> "
        "identity (default: the first folder of each path is the identity)",
    )
    parser.add_argument(
        "--face-size",
        type=int,
        default=0,
        help="folder: short side (px) δ is computed at, then upsampled (0 = G's training size, else 112)",
    )
    parser.add_argument(
        "--format", choices=["png", "jpeg", "jpg"], default="png", help="shards: output format (png); folder: kept"
    )
    parser.add_argument(
        "--keep-metadata",
        action="store_true",
        help="folder: keep the ICC profile and EXIF (camera, exposure, time), never GPS, the EXIF thumbnail, "
        "MakerNote or XMP (default: pixels only)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="G's precision, both modes: auto = bf16 on CUDA and where the CPU has native bf16, else fp32 (the "
        "bytes depend on it, so a resume warns on a change)",
    )
    parser.add_argument("--png-level", type=int, default=1, help="PNG zlib level 0..9 (1; 0 = fastest, largest)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1..100 (95)")
    parser.add_argument("--batch-size", type=int, default=0, help="forward batch (0 = 256 on CUDA, 16 on CPU)")
    parser.add_argument("--workers", type=int, default=0, help="loader (decode) worker processes (0 = auto)")
    parser.add_argument("--encode-workers", type=int, default=0, help="encode pool size (0 = auto)")
    parser.add_argument(
        "--encode-backend", choices=["auto", "thread", "process"], default="auto", help="encode pool kind (auto)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU only: batches through G in parallel (0 = auto)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    parser.add_argument("--gpu-codec", action="store_true", help="CUDA: nvJPEG decode of JPEG inputs, GPU JPEG encode")
    parser.add_argument("--allow-unseen-labels", action="store_true", help="accept labels >= the generator's classes")
    parser.add_argument(
        "--new-identities",
        action="store_true",
        help="people the generator never saw: number this set's identities after its training classes",
    )
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="quarantine larger images (4096x4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> ProtectOptions:
    return ProtectOptions(
        generator=args.generator,
        inp=args.inp,
        out=args.out,
        labels=args.labels,
        format=args.format,
        png_level=args.png_level,
        jpeg_quality=args.jpeg_quality,
        batch_size=args.batch_size,
        workers=args.workers,
        encode_workers=args.encode_workers,
        encode_backend=args.encode_backend,
        threads=args.threads,
        device=args.device,
        gpu_codec=args.gpu_codec,
        seed=args.seed,
        allow_unseen_labels=args.allow_unseen_labels,
        new_identities=args.new_identities,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
        input_format=args.input_format,
        face_size=args.face_size,
        keep_metadata=args.keep_metadata,
        precision=args.precision,
    )


def protect(opts: ProtectOptions) -> tuple[RankSummary, dict[str, Any] | None]:
    """Run this rank's share; returns its summary and the manifest if this rank completed the set."""
    seed_everything(opts.seed)
    protector = Protector(opts)
    summary = protector.run()
    manifest = finalize_if_complete(protector.shard_set, protector.out_dir)
    return summary, manifest


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if is_folder_input(opts):
        return run_folder(opts)
    if opts.keep_metadata:
        raise ValueError("--keep-metadata applies to folder mode (shards hold pixels and labels, no photo metadata)")
    summary, manifest = protect(opts)
    is_main = summary.rank == 0
    if is_main or manifest is not None:
        print_rank_summary(summary)
    if manifest is None:
        console.print(
            f"rank {summary.rank}: shards done; the manifest is written by the last rank to finish "
            f"(or by a rerun, which skips finished shards)"
        )
        return 0
    print_manifest(manifest)
    if not manifest["balanced"]:
        print(f"segue protect: error: {opts.out}: " + "; ".join(manifest["problems"]), file=sys.stderr)
        return 1
    return 0


def print_folder_summary(summary: FolderSummary) -> None:
    written = [e for e in summary.entries if e["status"] == "written"]
    n = max(len(written), 1)
    rate = len(summary.entries) / summary.seconds if summary.seconds > 0 else 0.0
    row = [
        f"{summary.rank}/{summary.world_size}",
        f"{len(summary.entries)}+{summary.skipped}",
        str(len(written)),
        str(summary.count("quarantined")),
        str(max((e["max_abs"] for e in written), default=0)),
        f"{sum(e['mean_abs'] for e in written) / n:.2f}",
        f"{sum(e['psnr'] for e in written) / n:.2f}",
        f"{rate:,.1f}",
    ]
    columns = ["rank", "photos", "written", "quar.", "max|δ|", "mean|δ|", "PSNR", "img/s"]
    print_table("segue protect (folder): this rank (done now + earlier; |δ| in 1/255)", columns, [row])


def print_folder_manifest(manifest: dict[str, Any]) -> None:
    rows = [
        ["files in", str(manifest["files_in"])],
        ["written", str(manifest["written"])],
        ["quarantined", str(manifest["quarantined"])],
        ["ignored", str(manifest["ignored"])],
        ["balanced", "yes" if manifest["balanced"] else "NO"],
        ["face scale (px)", str(manifest["face_size"])],
        ["metadata", manifest.get("metadata", "dropped")],
    ]
    for fmt, row in manifest["formats"].items():
        bound = (
            "n/a (lossy: measured)"
            if row["eps_bound_holds"] is None
            else ("holds" if row["eps_bound_holds"] else "VIOLATED")
        )
        rows.append([f"{fmt}: {row['files']} files, ε ({manifest['eps_levels']} levels)", bound])
        rows.append([f"{fmt}: max |δ| / PSNR", f"{row['max_abs_delta']} / {row['psnr_mean']:.2f} dB"])
    print_table("segue protect (folder)", ["", "value"], rows, path=manifest["output"])
    for q in manifest["quarantined_files"][:20]:
        console.print(f"  quarantined {q['path']}: {q['reason']}")
    if manifest["quarantined"] > 20:
        console.print(f"  ... {manifest['quarantined'] - 20} more in {QUARANTINE_NAME}")


def run_folder(opts: ProtectOptions) -> int:
    seed_everything(opts.seed)
    summary, manifest, _ = protect_folder(opts)
    if summary.rank == 0 or manifest is not None:
        print_folder_summary(summary)
    if manifest is None:
        console.print(f"rank {summary.rank}: photos done; the manifest is written by the last rank to finish")
        return 0
    print_folder_manifest(manifest)
    if not manifest["balanced"]:
        print(f"segue protect: error: {opts.out}: the manifest does not balance", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from segue_dist.cli import stage_main

    return stage_main("protect", argv)
