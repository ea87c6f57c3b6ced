"""`segue shards build`: counts, stable labels, resume after kill -9, bad inputs, input layouts and options."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import unicodedata
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from segue_dist.data.images import decode_image
from segue_dist.data.loader import OnePassStream, open_shard_set
from segue_dist.shards import ShardsConfig, build_shards, list_inputs
from segue_dist.utils.io import read_json

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ helpers


def rgb(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def jpeg_bytes(arr: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def identity_tree(root: Path, counts: dict[str, int], ext: str = "jpg", size: tuple[int, int] = (40, 48)) -> Path:
    """Identity folders of small distinct images; returns root."""
    for i, (name, n) in enumerate(sorted(counts.items())):
        for j in range(n):
            arr = rgb(1000 * i + j, *size)
            data = jpeg_bytes(arr) if ext == "jpg" else png_bytes(Image.fromarray(arr, "RGB"))
            write(root / name / f"{j:03d}.{ext}", data)
    return root


def build(src: Path, out: Path, **kw) -> dict:
    kw.setdefault("workers", 1)
    return build_shards(ShardsConfig(src=str(src), out=str(out), **kw), show_progress=False)


def read_split(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} over every tar of a split, asserting keys are unique."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(split_dir.glob("*.tar")):
        groups: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(tar_path) as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                groups[key][ext] = tf.extractfile(member).read()
        for key, group in groups.items():
            assert key not in samples, f"duplicate key {key}"
            samples[key] = group
    return samples


def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def image_of(sample: dict[str, bytes]) -> bytes:
    return sample.get("jpg", sample.get("png"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_consistent(out: Path) -> dict:
    """Invariants of any finished build: sizes.json = tar contents = stats, cls = labels.json[identity], no temps."""
    summary = read_json(out / "dataset.json")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    total = 0
    for split, info in summary["splits"].items():
        split_dir = out / split
        sizes = read_json(split_dir / "sizes.json")
        labels = read_json(split_dir / "labels.json")["labels"]
        samples = read_split(split_dir)
        per_tar = {}
        for tar_path in sorted(split_dir.glob("*.tar")):
            with tarfile.open(tar_path) as tf:
                per_tar[tar_path.name] = len({m.name.partition(".")[0] for m in tf})
            stats = read_json(split_dir / tar_path.name.replace(".tar", "._stats.json"))
            assert stats["written"] == per_tar[tar_path.name]
            assert stats["planned"] == stats["written"] + stats["skipped"]
        assert per_tar == sizes
        assert info["samples"] == len(samples) == sum(sizes.values())
        for sample in samples.values():
            assert int(sample["cls"]) == labels[meta(sample)["identity"]]
        total += len(samples)
    assert summary["samples"] == total
    assert summary["planned"] == summary["samples"] + summary["skipped"]
    assert summary["inputs_listed"] == summary["planned"] + summary["inputs_below_min"] + summary["inputs_over_max"]
    return summary


# ---------------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def glint_build(faces_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    src = faces_root / "glint24"
    out = tmp_path_factory.mktemp("glint") / "g24"
    return src, out, build(src, out, samples_per_shard=500)


@pytest.mark.realdata
def test_glint24_counts_in_equal_counts_out(glint_build: tuple[Path, Path, dict]) -> None:
    src, out, summary = glint_build
    folders = {d.name: len(list(d.iterdir())) for d in src.iterdir() if d.is_dir()}
    assert len(folders) == 24 and sum(folders.values()) == 2259
    assert summary["identities"] == 24 and summary["samples"] == 2259 and summary["skipped"] == 0
    assert summary["inputs_listed"] == 2259 and summary["splits"]["train"]["shards"] == 5
    check_consistent(out)
    samples = read_split(out / "train")
    per_identity = Counter(meta(s)["identity"] for s in samples.values())
    assert dict(per_identity) == {unicodedata.normalize("NFC", k): v for k, v in folders.items()}
    labels = read_json(out / "train" / "labels.json")["labels"]
    assert labels == {name: i for i, name in enumerate(sorted(labels))}
    # PNG faces with no resize are stored as they are: byte-equal to the source files.
    for sample in samples.values():
        assert sample["png"] == (src / meta(sample)["source"]).read_bytes()


@pytest.mark.realdata
def test_glint24_labels_stable_across_reruns_and_builds(glint_build: tuple[Path, Path, dict], tmp_path: Path) -> None:
    src, out, _ = glint_build
    before = tree_bytes(out)
    again = build(src, out, samples_per_shard=500)
    assert again["shards_built_now"] == 0
    assert tree_bytes(out) == before  # a finished build is left exactly as it is
    other = build(src, tmp_path / "other", samples_per_shard=300, workers=2)
    assert other["shards_built_now"] == 8
    labels = read_json(out / "train" / "labels.json")
    assert read_json(tmp_path / "other" / "train" / "labels.json") == labels
    first = {k: (s["cls"], meta(s)["source"]) for k, s in read_split(out / "train").items()}
    second = {k: (s["cls"], meta(s)["source"]) for k, s in read_split(tmp_path / "other" / "train").items()}
    assert first == second


@pytest.mark.realdata
def test_lfw62_subset(faces_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "lfw62"
    summary = build(faces_root / "lfw423", out, min_per_identity=20, size=[32], samples_per_shard=1000, workers=2)
    assert summary["identities"] == 62 and summary["samples"] == 3023 and summary["skipped"] == 0
    assert summary["inputs_listed"] == 5985 and summary["inputs_below_min"] == 5985 - 3023
    check_consistent(out)
    shard_set = open_shard_set(out / "train")
    assert shard_set.num_samples == 3023 and shard_set.num_classes == 62
    samples = read_split(out / "train")
    assert min(Counter(meta(s)["identity"] for s in samples.values()).values()) >= 20
    for sample in list(samples.values())[::50]:
        assert decode_image(sample["jpg"]).size == (32, 32)
        assert meta(sample)["orig_size"] == [250, 250]


# ---------------------------------------------------------------------------------------------- interrupted build


@pytest.mark.slow
def test_killed_build_resumes_to_identical_shards(tmp_path: Path) -> None:
    """kill -9 a build once some shards exist, rerun it: every file equals an uninterrupted build's."""
    src = identity_tree(tmp_path / "src", {f"person {i:02d}": 24 for i in range(12)}, size=(64, 64))
    write(src / "person 00" / "zz_bad.jpg", b"not a jpeg")  # a skip recorded in some shard's stats
    args = [
        "--src",
        str(src),
        "--samples-per-shard",
        "6",
        "--workers",
        "1",
        "--size",
        "40x32",
        "--test-per-identity",
        "2",
    ]
    cmd = [sys.executable, "-m", "segue_dist.cli", "shards", "build"]
    env = {**os.environ, "COLUMNS": "120"}

    # The uninterrupted reference is built in-process with the same settings (so this also checks CLI == API).
    full = tmp_path / "full"
    build(src, full, samples_per_shard=6, size=[40, 32], test_per_identity=2)
    n_tars = len(list(full.rglob("*.tar")))
    assert n_tars == 45 + 4  # train: 12 * 22 + 1 samples in 6s; test: 24

    part = tmp_path / "part"
    proc = subprocess.Popen([*cmd, *args, "--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(part.rglob("*._stats.json")):
            assert proc.poll() is None, "build ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = len(list(part.rglob("*._stats.json")))
    assert 0 < finished < n_tars, f"kill landed after {finished} of {n_tars} shards"
    assert not (part / "dataset.json").exists()
    # A writer killed mid-file leaves a temporary; plant one too in case the kill fell between two shards.
    write(part / "train" / ".00003.tar.abcd1234.tmp", b"half a shard")
    # A tar without its stats (killed between the rename and the stats) must be redone, not trusted; test shards
    # are written last, so the killed run cannot have finished this one.
    assert not (part / "test" / "00003._stats.json").exists()
    write(part / "test" / "00003.tar", b"garbage")
    # Shards of an earlier, bigger build in the same folder are not part of this one.
    write(part / "train" / "00050.tar", b"stale")
    write(part / "train" / "00050._stats.json", b'{"written": 9, "skipped": 0}')

    rerun = subprocess.run([*cmd, *args, "--out", str(part)], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert not [p for p in part.rglob("*") if p.name.endswith(".tmp")]
    a, b = tree_bytes(full), tree_bytes(part)
    assert sorted(a) == sorted(b)
    for name in a:
        if name == "shards_config.yaml":  # names its own --out; everything else is byte-identical
            assert a[name].replace(str(full).encode(), b"OUT") == b[name].replace(str(part).encode(), b"OUT")
        else:
            assert a[name] == b[name], name
    summary = check_consistent(part)
    assert summary["skipped"] == 1 and summary["samples"] == 12 * 24


# ----------------------------------------------------------------------------------------------------- bad inputs


def test_corrupt_and_odd_inputs_are_converted_or_skipped_never_fatal(tmp_path: Path) -> None:
    src = tmp_path / "src"
    person = src / "Odd Inputs"
    good = jpeg_bytes(rgb(1))
    write(person / "00_good.jpg", good)
    write(person / "01_truncated.jpg", good[: len(good) // 2])
    write(person / "02_text.jpg", b"this is not an image\n")
    write(person / "03_empty.jpg", b"")
    write(person / "04_cmyk.jpg", jpeg_bytes(rgb(4), "CMYK"))
    write(person / "05_alpha.png", png_bytes(Image.fromarray(rgb(5), "RGB").convert("RGBA")))
    write(person / "06_gray.jpg", jpeg_bytes(rgb(6), "L"))
    write(person / "07_bomb.png", bomb_png())
    write(person / "08_palette.png", png_bytes(Image.fromarray(rgb(8), "RGB").convert("P")))
    write(person / "09_palette_transparent.png", png_bytes(Image.fromarray(rgb(9), "RGB").convert("P"), transparency=0))
    write(person / "10_16bit.png", png_bytes(Image.fromarray(rgb(10)[..., 0].astype(np.uint16) * 257)))
    write(
        person / "11_image.bmp",
        (lambda b: (Image.fromarray(rgb(11), "RGB").save(b, format="BMP"), b.getvalue()))(io.BytesIO())[1],
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    write(person / "12_exif_rotated.jpg", jpeg_bytes(rgb(12, 40, 48), exif=exif.tobytes()))
    write(person / "13_png_named.jpg", png_bytes(Image.fromarray(rgb(13), "RGB")))
    write(person / "14_gray.png", png_bytes(Image.fromarray(rgb(14)[..., 0], "L")))
    write(person / "._15_appledouble.jpg", b"\x00\x05\x16\x07 finder metadata")  # hidden: not an input at all
    write(person / "notes.txt", b"not listed: not an image extension")
    expected_written = 11
    if features.check("webp"):
        buf = io.BytesIO()
        Image.fromarray(rgb(16), "RGB").save(buf, format="WEBP", lossless=True)
        write(person / "16_image.webp", buf.getvalue())
        expected_written += 1
    identity_tree(src, {"Plain Person": 3})

    for size in (None, [32, 24]):
        out = tmp_path / f"out_{size}"
        summary = build(src, out, size=size or [])
        check_consistent(out)
        assert summary["inputs_listed"] == expected_written + 4 + 3
        assert summary["samples"] == expected_written + 3
        reasons = {Path(s["source"]).name: s["reason"] for s in summary["splits"]["train"]["skipped_samples"]}
        assert set(reasons) == {"01_truncated.jpg", "02_text.jpg", "03_empty.jpg", "07_bomb.png"}
        assert "truncated" in reasons["01_truncated.jpg"]
        assert "not an image" in reasons["02_text.jpg"]
        assert "empty" in reasons["03_empty.jpg"]
        assert "too large" in reasons["07_bomb.png"]
        stats = [read_json(p) for p in (out / "train").glob("*._stats.json")]
        notes = {Path(c["source"]).name: c["note"] for st in stats for c in st["converted_samples"]}
        converted = {"04_cmyk.jpg", "05_alpha.png", "08_palette.png", "09_palette_transparent.png", "10_16bit.png"}
        converted |= {"11_image.bmp"} | ({"16_image.webp"} if features.check("webp") else set())
        assert set(notes) == converted
        assert summary["splits"]["train"]["converted"] == len(converted)
        assert "CMYK" in notes["04_cmyk.jpg"] and "BMP" in notes["11_image.bmp"]

        samples = {Path(meta(s)["source"]).name: s for s in read_split(out / "train").values()}
        for name, sample in samples.items():
            img = decode_image(image_of(sample))
            assert img.mode == "RGB"
            if size:
                assert img.size == (24, 32), name
        # JPEG stays JPEG; PNG and every other format become lossless PNG; the magic bytes decide, not the name.
        assert "jpg" in samples["04_cmyk.jpg"] and "png" in samples["11_image.bmp"]
        assert "png" in samples["13_png_named.jpg"]
        assert meta(samples["12_exif_rotated.jpg"])["orig_size"] == [40, 48]  # upright: EXIF orientation applied
        if size is None:
            for kept in ("00_good.jpg", "06_gray.jpg", "12_exif_rotated.jpg", "13_png_named.jpg", "14_gray.png"):
                assert image_of(samples[kept]) == (person / kept).read_bytes(), kept
            alpha = np.asarray(decode_image(samples["05_alpha.png"]["png"]))
            assert np.array_equal(alpha, rgb(5))  # opaque alpha: pixels unchanged, losslessly
            assert decode_image(samples["12_exif_rotated.jpg"]["jpg"]).size == (40, 48)

    # The loader sees the same: every written sample decodes, nothing is bad.
    records = list(OnePassStream(list(open_shard_set(tmp_path / "out_None" / "train").shards)))
    assert sum(r.error is None for r in records if hasattr(r, "error")) == expected_written + 3


def test_bad_tar_inputs_never_fatal(tmp_path: Path) -> None:
    src = tmp_path / "tars"
    make_tar(
        src / "00000.tar", [(f"{i:09d}", {"jpg": jpeg_bytes(rgb(i)), "json": {"identity": "A"}}) for i in range(4)]
    )
    # Caption first, then the image, so the cut leaves sample x1 listed (identity known) with a truncated image.
    damaged = make_tar(
        src / "00001.tar", [(f"x{i:08d}", {"txt": "B", "jpg": jpeg_bytes(rgb(10 + i))}) for i in range(4)]
    )
    with tarfile.open(damaged) as tf:
        cut = tf.getmember("x00000001.jpg").offset_data + 100
    damaged.write_bytes(damaged.read_bytes()[:cut])
    write(src / "00002.tar", b"not a tar at all")
    summary = build(src, tmp_path / "out")
    check_consistent(tmp_path / "out")
    assert summary["identities"] == 2 and summary["planned"] == 6 and summary["samples"] == 5
    (skip,) = summary["splits"]["train"]["skipped_samples"]
    assert skip["source"] == "00001.tar::x00000001.jpg" and "truncated" in skip["reason"]
    warnings = " ".join(summary["input_warnings"])
    assert "00001.tar unreadable after 2 samples" in warnings and "00002.tar unreadable" in warnings


# --------------------------------------------------------------------------------------------------- input layouts


def test_unicode_and_space_identity_names(tmp_path: Path) -> None:
    src = identity_tree(tmp_path / "src", {"José Álvarez": 3, "李 小龙": 4, "Ann Lee": 2})
    # The same person written decomposed (as macOS does) is the same identity.
    nfd = unicodedata.normalize("NFD", "José Álvarez")
    assert nfd != "José Álvarez"
    write(src / nfd / "099.jpg", jpeg_bytes(rgb(99)))
    out = tmp_path / "out with space"
    summary = build(src, out)
    check_consistent(out)
    labels = read_json(out / "train" / "labels.json")["labels"]
    assert labels == {"Ann Lee": 0, "José Álvarez": 1, "李 小龙": 2}
    counts = Counter(meta(s)["identity"] for s in read_split(out / "train").values())
    assert counts == {"José Álvarez": 4, "李 小龙": 4, "Ann Lee": 2}
    assert summary["samples"] == 10
    assert "José Álvarez" in (out / "train" / "labels.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_imagefolder_tree_keeps_its_split(tmp_path: Path, held_out: str) -> None:
    src = tmp_path / "tree"
    identity_tree(src / "train", {"alice": 5, "bob": 4})
    identity_tree(src / held_out, {"alice": 2, "bob": 1, "carol": 1})  # "val" is the held-out split too
    (src / ".ipynb_checkpoints").mkdir()  # hidden folders do not break the layout detection
    out = tmp_path / "out"
    summary = build(src, out, test_fraction=0.5)  # the tree's split wins over a computed one
    check_consistent(out)
    assert summary["splits"]["train"]["samples"] == 9 and summary["splits"]["test"]["samples"] == 4
    for split, expected in (("train", {"alice": 5, "bob": 4}), ("test", {"alice": 2, "bob": 1, "carol": 1})):
        samples = read_split(out / split).values()
        assert Counter(meta(s)["identity"] for s in samples) == expected
        assert all(meta(s)["source"].startswith(f"{split if split == 'train' else held_out}/") for s in samples)
    labels = read_json(out / "train" / "labels.json")
    assert labels == read_json(out / "test" / "labels.json")
    assert labels["labels"] == {"alice": 0, "bob": 1, "carol": 2}
    # Both "val" and "test" present is ambiguous: an error, not a silent merge.
    identity_tree(src / ("val" if held_out == "test" else "test"), {"alice": 1})
    with pytest.raises(ValueError, match="one split"):
        list_inputs(src)


def make_tar(path: Path, samples: list[tuple[str, dict[str, object]]], compress: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, fields in samples:
            for ext, value in fields.items():
                data = (
                    value
                    if isinstance(value, bytes)
                    else (json.dumps(value) if isinstance(value, dict) else str(value)).encode()
                )
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return write(path, gzip.compress(data, mtime=0) if compress else data)


def test_img2dataset_tars_are_rebuilt(tmp_path: Path) -> None:
    src = tmp_path / "img2dataset"
    jpgs = {f"{i:09d}": jpeg_bytes(rgb(i)) for i in range(12)}
    first = [
        (k, {"jpg": jpgs[k], "json": {"identity": "Ana María", "url": "http://x"}, "txt": "a caption"})
        for k in list(jpgs)[:5]
    ]
    first.append(("000000099", {"json": {"identity": "Ana María"}}))  # failed download: no image
    first.append(("000000098", {"jpg": jpeg_bytes(rgb(98)), "json": {"status": "ok"}}))  # no identity anywhere
    make_tar(src / "00000.tar", first)
    second = [
        (k, {"jpg": jpgs[k], "txt": "Bo Chen", "seg.png": png_bytes(Image.new("L", (4, 4)))}) for k in list(jpgs)[5:10]
    ]
    make_tar(src / "00001.tar", second)
    make_tar(src / "sub" / "00002.tar", [(k, {"jpg": jpgs[k], "cls": "7"}) for k in list(jpgs)[10:]], compress=True)
    write(src / "00000_stats.json", b"{}")
    write(src / "00000.parquet", b"PAR1")

    out = tmp_path / "out"
    summary = build(src, out)
    check_consistent(out)
    assert summary["identities"] == 3 and summary["samples"] == 12
    assert any("1 samples without an image and 1 without an identity" in n for n in summary["input_warnings"])
    samples = read_split(out / "train").values()
    assert Counter(meta(s)["identity"] for s in samples) == {"Ana María": 5, "Bo Chen": 5, "7": 2}
    by_source = {meta(s)["source"].split("::")[1].split(".")[0]: s for s in samples}
    for key, data in jpgs.items():
        assert by_source[key]["jpg"] == data  # JPEG bytes kept as they are, read by offset or from the gzip tar
    assert all("png" not in s for s in samples)  # `x.seg.png` is a field of x, not its image

    # Our own shard set (train/ + test/ tars) is an input too; its split is kept.
    split_out = tmp_path / "split"
    build(src, split_out, test_per_identity=1)
    again = build(split_out, tmp_path / "again", identity_field="identity")
    check_consistent(tmp_path / "again")
    assert again["splits"]["test"]["samples"] == 3 and again["splits"]["train"]["samples"] == 9


# ---------------------------------------------------------------------------------------------------------- options


def test_min_max_per_identity(tmp_path: Path) -> None:
    src = identity_tree(tmp_path / "src", {"a": 2, "b": 5, "c": 9})
    summary = build(src, tmp_path / "out", min_per_identity=3, max_per_identity=6)
    check_consistent(tmp_path / "out")
    counts = Counter(meta(s)["identity"] for s in read_split(tmp_path / "out" / "train").values())
    assert counts == {"b": 5, "c": 6}
    assert read_json(tmp_path / "out" / "train" / "labels.json")["labels"] == {"b": 0, "c": 1}
    assert summary["inputs_below_min"] == 2 and summary["inputs_over_max"] == 3
    with pytest.raises(ValueError, match="at least 10"):
        build(src, tmp_path / "none", min_per_identity=10)


def split_sources(out: Path) -> dict[str, set[str]]:
    return {
        split: {meta(s)["source"] for s in read_split(out / split).values()}
        for split in ("train", "test")
        if (out / split).is_dir()
    }


def test_test_split_count_and_fraction(tmp_path: Path) -> None:
    src = identity_tree(tmp_path / "src", {"one": 1, "two": 2, "five": 5, "ten": 10})
    build(src, tmp_path / "count", test_per_identity=3)
    check_consistent(tmp_path / "count")
    test = Counter(meta(s)["identity"] for s in read_split(tmp_path / "count" / "test").values())
    train = Counter(meta(s)["identity"] for s in read_split(tmp_path / "count" / "train").values())
    assert test == {"two": 1, "five": 3, "ten": 3}  # never the whole identity: one image stays in train
    assert train == {"one": 1, "two": 1, "five": 2, "ten": 7}

    build(src, tmp_path / "frac", test_fraction=0.2)
    test = Counter(meta(s)["identity"] for s in read_split(tmp_path / "frac" / "test").values())
    assert test == {"two": 1, "five": 1, "ten": 2}

    # Deterministic per identity: same seed, same split; adding an identity does not move anyone else's images.
    build(src, tmp_path / "frac2", test_fraction=0.2, samples_per_shard=3)
    assert split_sources(tmp_path / "frac") == split_sources(tmp_path / "frac2")
    identity_tree(tmp_path / "src", {"zed": 6})
    build(src, tmp_path / "more", test_fraction=0.2)
    more = split_sources(tmp_path / "more")
    assert {s for s in more["test"] if not s.startswith("zed/")} == split_sources(tmp_path / "frac")["test"]
    build(src, tmp_path / "seed1", test_fraction=0.2, seed=1)
    assert split_sources(tmp_path / "seed1")["test"] != more["test"]


def test_resize_non_square_and_formats(tmp_path: Path) -> None:
    src = tmp_path / "src"
    identity_tree(src, {"jpgs": 3}, ext="jpg", size=(60, 80))
    identity_tree(src, {"pngs": 3}, ext="png", size=(60, 80))
    out = tmp_path / "out"
    summary = build(src, out, size=[48, 32])
    assert summary["size"] == [48, 32]
    for sample in read_split(out / "train").values():
        img = decode_image(image_of(sample))
        assert img.size == (32, 48)  # PIL size is (w, h): the config is [h, w]
        assert meta(sample)["orig_size"] == [80, 60]
        assert ("jpg" in sample) == (meta(sample)["identity"] == "jpgs")  # JPEG stays JPEG, PNG stays lossless PNG
    # No resize: JPEG and PNG bytes are exactly the source files.
    build(src, tmp_path / "keep")
    for sample in read_split(tmp_path / "keep" / "train").values():
        assert image_of(sample) == (src / meta(sample)["source"]).read_bytes()


def test_samples_per_shard_and_rebuild_with_new_settings(tmp_path: Path) -> None:
    src = identity_tree(tmp_path / "src", {f"p{i}": 5 for i in range(5)})
    out = src / "_shards"  # the output may live inside the source: it is never read back as input
    first = build(src, out, samples_per_shard=4)
    assert first["identities"] == 5
    assert read_json(out / "train" / "sizes.json") == {f"{i:05d}.tar": 4 for i in range(6)} | {"00006.tar": 1}
    assert build(src, out, samples_per_shard=4)["shards_built_now"] == 0
    # Different settings into the same folder: shards whose plan changed are redone, extra old shards removed.
    second = build(src, out, samples_per_shard=10)
    assert second["shards_built_now"] == 3
    assert sorted(p.name for p in (out / "train").iterdir() if p.name.endswith(".tar")) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    check_consistent(out)
    third = build(src, out, samples_per_shard=10, size=[16])
    assert third["shards_built_now"] == 3
    assert all(decode_image(image_of(s)).size == (16, 16) for s in read_split(out / "train").values())
    # A split that the new plan does not have disappears with its metadata.
    build(src, out, samples_per_shard=10, test_per_identity=1)
    assert (out / "test" / "sizes.json").is_file()
    build(src, out, samples_per_shard=10)
    assert not (out / "test").exists()
    check_consistent(out)


def test_out_may_not_overwrite_src(tmp_path: Path) -> None:
    src = identity_tree(tmp_path / "src", {"a": 2})
    build(src, tmp_path / "shards")
    with pytest.raises(ValueError, match="overwrite"):
        build(tmp_path / "shards" / "train", tmp_path / "shards")
    with pytest.raises(ValueError, match="overwrite"):
        build(src, src)
