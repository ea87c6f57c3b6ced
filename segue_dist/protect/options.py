"""`segue protect`'s settings: :class:`ProtectOptions` (validated), how automatic worker counts are chosen, what a
run's output depends on (``_protect.json``, recorded on a first run and checked on resume) and where shard mode's
labels come from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segue_dist.data.loader import ShardSet
from segue_dist.data.sidecar import read_sidecar
from segue_dist.utils.device import cpus_per_process
from segue_dist.utils.io import atomic_write_json, read_json
from segue_dist.weights import label_map_hash

# The generator halves the resolution twice and instance-normalises the bottleneck, so it needs sides >= 8 px.
MIN_SIDE = 8
FORMATS = ("png", "jpeg")
INPUT_FORMATS = ("auto", "shards", "folder")
PRECISIONS = ("auto", "fp32", "bf16")
# Test hook: seconds to sleep after each written batch, so a test can kill -9 the job in the middle of a shard.
TEST_DELAY_ENV = "SEGUE_PROTECT_TEST_DELAY_S"


def delay_for_tests_s() -> float:
    """Seconds to sleep per unit of work, from ``TEST_DELAY_ENV`` (tests only: a window for ``kill -9``); 0 unset."""
    return float(os.environ.get(TEST_DELAY_ENV, "0") or 0)


@dataclass
class ProtectOptions:
    """Everything `segue protect` needs; validated on construction (a bad value is a one-line ``ValueError``)."""

    generator: str
    inp: str
    out: str
    labels: str | None = None  # pseudo-label sidecar (key -> label); None = the shards' `.cls`
    format: str = "png"
    png_level: int = 1
    jpeg_quality: int = 95
    batch_size: int = 0  # images per forward batch (per shard and size); 0 = 256 on CUDA, 16 on CPU
    workers: int = 0  # loader worker processes; 0 = pick from the CPU count
    encode_workers: int = 0  # encode pool size; 0 = pick from the CPU count
    encode_backend: str = "auto"  # thread | process | auto (process for JPEG with >= 4 encoders, else thread)
    threads: int = 0  # CPU only: batches run through G in parallel (each on one intra-op thread); 0 = auto
    device: str = "auto"
    gpu_codec: bool = False  # CUDA only: nvJPEG decode of JPEG inputs and, for JPEG output, encode on the GPU
    seed: int = 0
    allow_unseen_labels: bool = False  # labels >= num_classes (up to 2**bits - 1) are legal codes, never trained
    new_identities: bool = False  # people G never saw: label i gets code num_classes + i (implies unseen codes)
    max_pixels: int = 4096 * 4096
    inflight: int = 0  # forward batches whose encode may be pending at once; 0 = 2 x encode workers + 2
    progress: bool = True
    input_format: str = "auto"  # shards | folder | auto (folder when --in is a folder without sizes.json or tars)
    face_size: int = 0  # folder mode: short side δ is computed at; 0 = G's training size (generator.json), else 112
    precision: str = "auto"  # G: auto (bf16 on CUDA and where the CPU has native bf16, else fp32) | fp32 | bf16
    keep_metadata: bool = False  # folder mode: ICC + EXIF, never GPS / thumbnail / MakerNote / XMP (metadata.py)

    def __post_init__(self) -> None:
        if self.format == "jpg":
            self.format = "jpeg"
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"png_level must be in 0..9, got {self.png_level}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        for name in ("batch_size", "workers", "encode_workers", "threads", "inflight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        if self.encode_backend not in ("auto", "thread", "process"):
            raise ValueError(f"encode_backend must be auto, thread or process, got {self.encode_backend!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.face_size != 0 and self.face_size < MIN_SIDE:
            raise ValueError(f"face_size must be 0 (G's training size) or >= {MIN_SIDE}, got {self.face_size}")
        if self.max_pixels < MIN_SIDE * MIN_SIDE:
            raise ValueError(f"max_pixels must be >= {MIN_SIDE * MIN_SIDE}, got {self.max_pixels}")
        if not self.generator or not self.inp or not self.out:
            raise ValueError("protect needs --generator, --in and --out")


def resolve_workers(opts: ProtectOptions, on_cuda: bool) -> tuple[int, int, int]:
    """(loader workers, encode workers, CPU G threads). Explicit values win; 0 means pick from the cores.

    On CPU, G costs far more than decode + encode (``docs/protect_benchmarks.md``), so every core runs a G thread
    (one batch at a time, one intra-op thread each) and the codec workers, mostly idle, share them. On a GPU host the cores are all for codecs: about a third decode (JPEG
    decode is cheaper than encode + the verifying decode), the rest encode.
    """
    cores = cpus_per_process()
    if on_cuda:
        workers = opts.workers or max(1, cores // 3)
        encoders = opts.encode_workers or max(1, cores - workers - 1)
        return workers, encoders, 1
    threads = opts.threads or cores
    workers = opts.workers or max(1, cores // 4)
    encoders = opts.encode_workers or max(1, cores // 2)
    return workers, encoders, threads


def resolve_encode_backend(choice: str, fmt: str, encoders: int) -> str:
    """PIL's zlib releases the GIL, so PNG encodes well in threads; its JPEG path mostly does not (threads ran
    decode + encode several times slower than processes: docs/measurements.md), so several JPEG encoders are
    processes."""
    if choice != "auto":
        return choice
    return "process" if fmt == "jpeg" and encoders >= 4 else "thread"


# Shard mode on the CPU: at most this many pixels per forward batch (8 images of 112 x 112; 2 of 224 x 224), so that
# G's activations stay in the caches (docs/protect_benchmarks.md); --batch-size stays the cap in images.
CPU_BATCH_PIXELS = 8 * 112 * 112


def resolve_batch_size(opts: ProtectOptions, on_cuda: bool) -> int:
    """Images per forward batch (shard mode: per shard and size; folder mode: photos per chunk). Big batches feed a
    GPU; on CPU a batch runs on one intra-op thread, batches in parallel, and small ones start encoding sooner
    (and bound memory tighter)."""
    return opts.batch_size or (256 if on_cuda else 16)


SETTINGS_NAME = "_protect.json"


# Keys whose change would make one output set mix two different protections: a resume refuses them.
SETTINGS_MUST_MATCH = ("generator_sha256", "eps", "format", "png_level", "jpeg_quality", "labels", "metadata")
# Keys whose change keeps the protection valid but may flip the odd uint8 rounding: a resume warns.
SETTINGS_SHOULD_MATCH = ("compute", "batch_size", "batch_pixels")


def check_or_record_settings(out_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Record the settings on a first run; on a resume, refuse incompatible ones. Returns warnings."""
    path = out_dir / SETTINGS_NAME
    if not path.is_file():
        if any(out_dir.glob("*.tar")):
            raise ValueError(f"{out_dir} holds .tar shards not written by segue protect; choose an empty --out")
        atomic_write_json(path, settings)  # every rank writes the same content: the race is harmless
        return []
    previous = read_json(path)
    for key in SETTINGS_MUST_MATCH:
        if previous.get(key) != settings.get(key):
            raise ValueError(
                f"{out_dir} was started with {key}={previous.get(key)!r}, this run has {settings.get(key)!r}; "
                f"resume with the same settings or choose a new --out"
            )
    return [
        f"{key} differs from the run that started {out_dir} ({previous.get(key)!r} -> {settings.get(key)!r}): "
        f"shards written now may differ in the odd uint8 rounding from an uninterrupted run"
        for key in SETTINGS_SHOULD_MATCH
        if previous.get(key) != settings.get(key)
    ]


def sidecar_file(path: str) -> Path:
    """The sidecar file of ``--labels`` (a folder means its ``pseudo_labels.json``)."""
    p = Path(path)
    return p / "pseudo_labels.json" if p.is_dir() else p


@dataclass(frozen=True)
class CodeRange:
    """G's codes for a set's labels: code = label + ``offset``, legal in ``[0, limit)``."""

    offset: int  # G's training classes for --new-identities, else 0
    limit: int
    hint: str  # the flag that widens the limit ("" when none does), for error messages

    def fits(self, top_label: int) -> bool:
        """Whether labels ``0..top_label`` all get a legal code."""
        return top_label + self.offset < self.limit

    def room(self) -> str:
        """How many labels G can code for this set, for error messages ("5 after its 3 training identities")."""
        after = f" after its {self.offset} training identities" if self.offset else ""
        return f"{self.limit - self.offset}{after}{self.hint}"

    def context_suffix(self) -> str:
        """What the offset adds to the label source recorded for a resume ("" without one)."""
        return f" + {self.offset}" if self.offset else ""


@dataclass
class LabelPlan:
    label_map: dict[str, int] | None  # None = use `.cls`
    codes: CodeRange
    warnings: list[str] = field(default_factory=list)


def code_range(opts: ProtectOptions, gen_cfg: Any) -> CodeRange:
    """The codes G gives a set's labels. With ``new_identities`` the set's identities are numbered after G's
    ``num_classes`` training identities (paper: the once-trained generator protects people who joined later), so every
    code above them is legal; ``allow_unseen_labels`` takes the labels as codes, up to ``2**bits - 1``."""
    num_classes, bits = int(gen_cfg.num_classes), int(gen_cfg.bits)
    offset = num_classes if opts.new_identities else 0
    if opts.allow_unseen_labels or opts.new_identities:
        return CodeRange(offset, 2**bits, "")
    return CodeRange(offset, num_classes, f" (--allow-unseen-labels accepts labels up to {2**bits - 1})")


def plan_labels(opts: ProtectOptions, shard_set: ShardSet, gen_meta: dict[str, Any], gen_cfg: Any) -> LabelPlan:
    """Where G's side information comes from, and a clear error if the generator cannot code those labels."""
    codes = code_range(opts, gen_cfg)
    warnings_: list[str] = []
    if opts.labels is not None:
        label_map, k = read_sidecar(opts.labels)
        if not codes.fits(k - 1):
            raise ValueError(f"sidecar {opts.labels} has K={k} pseudo-labels but the generator codes {codes.room()}")
        return LabelPlan(label_map, codes, warnings_)
    if shard_set.labels:
        top = max(shard_set.labels.values())
        if not codes.fits(top):
            raise ValueError(
                f"{shard_set.root}/labels.json has labels up to {top} but the generator codes only {codes.room()}"
            )
        trained_hash = gen_meta.get("label_map_sha256", "")
        if (
            not codes.offset
            and trained_hash
            and gen_meta.get("label_source", "cls") == "cls"
            and trained_hash != label_map_hash(shard_set.labels)
        ):
            warnings_.append(
                "the generator was trained with a different label map than this shard set's labels.json: labels "
                "just index codes, so this works, but identity i gets the code identity i had in training"
            )
    return LabelPlan(None, codes, warnings_)
