"""`segue protect`: perturb a whole shard set with a trained Segue generator: sharded, distributed, resumable.

Usage::

    segue protect --generator runs/lfw62/generator.safetensors \\
        --in shards/lfw62/train --out shards/lfw62-protected/train [--labels pseudo_labels.json] \\
        [--format png|jpeg] [--png-level 1] [--jpeg-quality 95] [--batch-size N] [--workers N] [--encode-workers N]

    # the same on several GPUs or nodes: shards are split statically by rank, no collectives are used
    torchrun --nproc_per_node 8 -m segue_dist.protect --generator ... --in ... --out ...
    accelerate launch -m segue_dist.protect --generator ... --in ... --out ...

What it guarantees

* **ε on what is written.** The perturbed image is quantised to uint8 and then clamped *in integers* to
  ``original ± floor(255·ε)`` (8 levels for ε = 8/255), where ``original`` is the decoded input image. Each written
  file is decoded again and compared with the original: for PNG the bound is a checked guarantee
  (``eps_bound_holds: true``), for JPEG the compression error comes on top, so the measured bound is reported
  instead (``eps_bound_holds: null, measured_max_abs: ...``).
* **Nothing lost or duplicated.** Output shard ``NNNNN.tar`` keeps its input shard's name and every sample's key,
  ``.cls`` and ``.json`` (plus a ``"protected"`` entry). A shard is written under a temporary name and renamed, and
  its ``NNNNN._stats.json`` is written last: its presence marks the shard finished. A rerun skips finished shards
  and redoes unfinished ones, so a job killed at any point (``kill -9`` included) finishes on rerun. Once every
  shard is finished, ``sizes.json``, ``labels.json``, ``_quarantine.jsonl`` and finally ``_manifest.json`` are
  written; the manifest balances ``samples_in == samples_out + quarantined`` or the job exits non-zero.
* **Deterministic bytes.** Output bytes depend on the generator, the input shard and the settings only, never on the
  number of ranks, loader or encode workers, or on an interruption: tar members have a fixed mtime, encoders have
  fixed settings, and a shard's images are grouped into forward batches by that shard alone (per size, in shard
  order, ``--batch-size`` at most). A batch's composition and G's precision fix its bytes (float kernels give
  batch-dependent low bits that can flip the odd uint8 rounding), so both are recorded in ``_protect.json`` and a
  resume with another value warns. On CPU each batch runs on one intra-op thread (batches in parallel), so the
  thread count cannot change a byte; on CUDA (bf16 autocast, cuDNN deterministic) results are exact for a given
  GPU model.
* **Bad samples never stop the job.** Corrupt, truncated, empty, non-image, decompression-bomb, too-small and
  unlabelled samples are quarantined with a one-line reason (per-shard stats, ``_quarantine.jsonl``, manifest);
  CMYK, grayscale, palette and alpha images are converted to RGB by ``decode_image``. Images of different sizes in
  one shard are batched per size.
* **Streaming.** Bounded queues everywhere (loader prefetch, in-flight batches, per-shard size buckets of at most
  ``--batch-size`` images), so memory does not grow with the corpus.

Pipeline (one rank): loader worker processes read and decode the rank's shards (``OnePassStream``, images sent in
groups as HWC numpy arrays) -> the main thread groups each shard's images into forward batches and runs G (CUDA:
bf16 autocast, channels_last, pinned asynchronous copies; CPU: a pool of one-thread G workers, bf16 where native)
-> an encode pool
(threads for PNG, processes for JPEG) writes each image and decodes it again to check ε, overlapping the next
forward -> one tar-writer thread appends results to each shard's tar in submission order and finishes shards
(fsync, rename, stats), so the main thread waits only when more than ``inflight`` batches are outstanding. With
``--gpu-codec`` (CUDA), plain JPEG inputs are decoded by nvJPEG in batches and JPEG output is encoded and verified
on the GPU; the ε check is then against nvJPEG's decode of the input.

Measured costs of each output format and where the time goes: ``docs/protect_benchmarks.md``.

Folder mode (``--in PHOTOS/``, a photo tree instead of shards): :mod:`.folder_mode` (one rank's share),
:mod:`.folder_records` (listing, labels, journal, manifest), :mod:`.photo` (one photo: modes, face-scale δ, format);
ε per format in ``docs/protect_folder.md``.

Modules: :mod:`.options` (settings, worker counts, resume checks, labels), :mod:`.quantise` (ε levels, the one
uint8 quantiser), :mod:`.perturber` (G, both modes), :mod:`.codecs` / :mod:`.gpu_codec` (the one encoder and ε
check), :mod:`.job` (what both modes share: setup, ordered writes, phase timer), :mod:`.stream` (input, size
buckets), :mod:`.output` (one shard), :mod:`.shard_mode` (one rank's shard job), :mod:`.manifest`, :mod:`.cli`.
Everything public is re-exported here.
"""

from __future__ import annotations

from segue_dist.data.shard_writer import STATS_SUFFIX, TAR_MTIME
from segue_dist.protect.cli import add_arguments, main, options_from_args, print_manifest, protect, run
from segue_dist.protect.codecs import (
    EncodedImage,
    EncodeSpec,
    ImageCheck,
    encode_and_verify,
    encode_image,
    encode_pil,
    make_encode_pool,
    measure,
    verify_decoded,
)
from segue_dist.protect.folder_mode import FolderProtector, FolderSummary, is_folder_input, protect_folder
from segue_dist.protect.folder_records import FOLDER_MANIFEST, Listing, list_folder, load_journal, photo_labels
from segue_dist.protect.gpu_codec import GpuCodec
from segue_dist.protect.job import OrderedWrites, PhaseTimer, ProtectJob, refuse_in_place
from segue_dist.protect.manifest import (
    MANIFEST_NAME,
    QUARANTINE_NAME,
    build_manifest,
    collect_finished,
    finalize_if_complete,
)
from segue_dist.protect.options import (
    FORMATS,
    MIN_SIDE,
    SETTINGS_NAME,
    TEST_DELAY_ENV,
    LabelPlan,
    ProtectOptions,
    check_or_record_settings,
    plan_labels,
    resolve_batch_size,
    resolve_encode_backend,
    resolve_workers,
)
from segue_dist.protect.output import ShardWriter, output_sample
from segue_dist.protect.perturber import Perturber, cpu_has_bf16, make_thread_pool
from segue_dist.protect.photo import PhotoFormat, Planes, face_scale_delta, face_shape, protect_photo, read_planes
from segue_dist.protect.quantise import delta_levels, eps_levels, quantise_protected
from segue_dist.protect.shard_mode import Protector, RankSummary
from segue_dist.protect.stream import Item, ProtectStream, SizeBuckets, iter_items

__all__ = [
    "OrderedWrites",
    "PhaseTimer",
    "PhotoFormat",
    "ProtectJob",
    "cpu_has_bf16",
    "delta_levels",
    "encode_pil",
    "verify_decoded",
    "FOLDER_MANIFEST",
    "FORMATS",
    "MANIFEST_NAME",
    "MIN_SIDE",
    "QUARANTINE_NAME",
    "SETTINGS_NAME",
    "STATS_SUFFIX",
    "TAR_MTIME",
    "TEST_DELAY_ENV",
    "EncodeSpec",
    "FolderProtector",
    "FolderSummary",
    "EncodedImage",
    "GpuCodec",
    "ImageCheck",
    "Item",
    "LabelPlan",
    "Listing",
    "Perturber",
    "Planes",
    "ProtectOptions",
    "ProtectStream",
    "Protector",
    "RankSummary",
    "ShardWriter",
    "SizeBuckets",
    "add_arguments",
    "build_manifest",
    "check_or_record_settings",
    "collect_finished",
    "encode_and_verify",
    "encode_image",
    "face_scale_delta",
    "face_shape",
    "eps_levels",
    "finalize_if_complete",
    "is_folder_input",
    "iter_items",
    "list_folder",
    "load_journal",
    "main",
    "make_encode_pool",
    "make_thread_pool",
    "measure",
    "options_from_args",
    "photo_labels",
    "output_sample",
    "plan_labels",
    "print_manifest",
    "protect",
    "protect_folder",
    "protect_photo",
    "quantise_protected",
    "read_planes",
    "refuse_in_place",
    "resolve_batch_size",
    "resolve_encode_backend",
    "resolve_workers",
    "run",
]
