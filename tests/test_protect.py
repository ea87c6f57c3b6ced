"""`segue protect`: ε on what is written, nothing lost or duplicated, byte-identical output across ranks, workers and
a kill -9 + rerun, bad samples quarantined or converted, and a manifest that balances (or fails loudly)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from segue_dist import protect
from segue_dist.data.images import decode_image, encode_jpeg, encode_png
from segue_dist.data.loader import iter_tar_samples
from segue_dist.data.sidecar import write_sidecar
from segue_dist.data.synthetic import generate_corpus
from segue_dist.models.generator import GeneratorConfig, SegueGenerator
from segue_dist.shards import ShardsConfig, build_shards
from segue_dist.utils.io import read_json
from segue_dist.weights import export_generator

REPO = Path(__file__).resolve().parents[1]
EPS_LEVELS = 8  # floor(255 * 8/255)
NUM_CLASSES = 5


# ---------------------------------------------------------------------------------------------------------- helpers


def make_generator(
    folder: Path, num_classes: int, label_map: dict[str, int] | None = None, seed: int = 0, bits: int = 16
) -> Path:
    torch.manual_seed(seed)
    generator = SegueGenerator(GeneratorConfig(num_classes=num_classes, width=8, num_res_blocks=1, bits=bits))
    return export_generator(generator, folder, label_map=label_map, label_source="cls")


def run_protect(generator: Path, inp: Path, out: Path, *extra: str) -> int:
    return protect.main(["--generator", str(generator), "--in", str(inp), "--out", str(out), "--no-progress", *extra])


def read_samples(split: Path) -> dict[str, dict[str, bytes]]:
    """key -> fields of every sample in every shard of a split (asserting no key appears twice)."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(split.glob("*.tar")):
        for raw in iter_tar_samples(str(tar)):
            assert "__error__" not in raw, raw["__error__"]
            key = raw["__key__"]
            assert key not in samples, f"duplicate key {key}"
            samples[key] = {k: v for k, v in raw.items() if not k.startswith("__")} | {"__shard__": tar.name}
    return samples


def tar_bytes(split: Path) -> dict[str, bytes]:
    return {tar.name: tar.read_bytes() for tar in sorted(split.glob("*.tar"))}


def image_bytes(fields: dict[str, bytes]) -> bytes:
    return next(fields[k] for k in ("png", "jpg", "jpeg") if k in fields)


def as_array(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data), dtype=np.int16)


def write_split(split: Path, shards: dict[str, list[dict[str, bytes | str]]], labels: dict[str, int]) -> None:
    """A hand-made shard set (tars written directly, so they may hold anything), with sizes.json and labels.json."""
    split.mkdir(parents=True)
    for name, samples in shards.items():
        with open(split / name, "wb") as fh, wds.TarWriter(fh, mtime=0.0, encoder=False) as sink:
            for sample in samples:
                sink.write(sample)
    (split / "sizes.json").write_text(json.dumps({name: len(samples) for name, samples in shards.items()}))
    (split / "labels.json").write_text(json.dumps({"labels": labels, "num_classes": len(labels)}))


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims ``width`` x ``height``: a decompression bomb's header."""
    data = encode_png(np.zeros((8, 8, 3), np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def noise_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def pil_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """5 synthetic identities x 13 images at 32 px in 20-sample shards: 4 shards (3 full, 1 of 5) - an odd split
    between two ranks - plus a 5-class generator with random weights (protect mechanics need no training)."""
    root = tmp_path_factory.mktemp("protect")
    src = root / "faces"
    for name, index, img in generate_corpus(identities=NUM_CLASSES, per_identity=13, size=32):
        (src / name).mkdir(parents=True, exist_ok=True)
        img.save(src / name / f"{index:03d}.png")
    build_shards(ShardsConfig(src=str(src), out=str(root / "shards"), samples_per_shard=20, workers=1), False)
    train = root / "shards" / "train"
    labels = read_json(train / "labels.json")["labels"]
    generator = make_generator(root / "gen", NUM_CLASSES, labels)
    reference = root / "reference"
    assert run_protect(generator, train, reference, "--workers", "2") == 0
    return {"root": root, "train": train, "generator": generator, "reference": reference}


# ------------------------------------------------------------------------------------------------------ unit level


def test_quantise_at_an_eps_off_the_255_grid() -> None:
    """ε = 0.03 is 7.65 levels: rounding original + 255·δ for δ = ε gives +8 (past ε); the clamp keeps +7."""
    original = torch.full((2, 4, 4, 3), 100, dtype=torch.uint8)
    delta = torch.full((2, 4, 4, 3), 0.03)
    levels = protect.eps_levels(0.03)
    assert levels == 7
    out = protect.quantise_protected(original, delta, levels)
    assert int(out.int().sub(100).max()) == 7 and int(protect.quantise_protected(original, -delta, levels).min()) == 93


def test_quantise_clamps_in_integers() -> None:
    original = torch.tensor([0, 3, 100, 100, 250, 255], dtype=torch.uint8)
    delta = torch.tensor([-0.5, 0.05, 8.49 / 255, 8.6 / 255, 8.6 / 255, 1.0])
    out = protect.quantise_protected(original, delta, 8)
    # 100 + 8.6 would round to 109: one level past ε, which the integer clamp takes back to 108.
    assert out.tolist() == [0, 11, 108, 108, 255, 255]
    assert (out.int() - original.int()).abs().max() <= 8


def test_quantise_rounds_delta_alone_so_ties_do_not_depend_on_the_pixel() -> None:
    """One rule in both modes: δ is rounded to whole levels on its own (half to even), then added. An exact
    half-level δ moves an odd and an even pixel by the same step (rounding x + 255·δ would not)."""
    original = torch.tensor([100, 101, 100, 101], dtype=torch.uint8)
    delta = torch.tensor([0.5, 0.5, 1.5, 1.5]) / 255
    assert protect.quantise_protected(original, delta, 8).tolist() == [100, 101, 102, 103]
    assert protect.delta_levels(delta, 8).tolist() == [0, 0, 2, 2]


def test_eps_levels_never_exceed_eps() -> None:
    assert protect.eps_levels(8 / 255) == 8
    assert protect.eps_levels(16 / 255) == 16
    assert protect.eps_levels(0.03) == 7  # 7.65 levels: rounding up would exceed ε


def test_size_buckets_are_deterministic_and_bounded() -> None:
    def item(i: int, side: int) -> protect.Item:
        return protect.Item(str(i), "s", 0, {}, {}, (side, side), np.zeros((side, side, 3), np.uint8))

    buckets = protect.SizeBuckets(batch_size=3)
    sides = [32, 32, 40, 32, 40, 48, 56, 40, 32]
    emitted = []
    for i, side in enumerate(sides):
        emitted += buckets.add(item(i, side))
        assert buckets.pending <= 3
    emitted += buckets.drain()
    flat = [r.key for batch in emitted for r in batch]
    assert sorted(flat, key=int) == [str(i) for i in range(len(sides))]  # every record exactly once
    assert all(len({r.image.shape for r in batch}) == 1 for batch in emitted)  # one size per batch
    # A full bucket goes at once; past batch_size waiting in all buckets, the oldest bucket goes early.
    assert [[r.key for r in b] for b in emitted] == [["0", "1", "3"], ["2", "4"], ["5"], ["6"], ["7"], ["8"]]
    # A pixel budget (shard mode on the CPU) caps big images' batches by their size alone.
    capped = protect.SizeBuckets(batch_size=16, batch_pixels=8 * 112 * 112)
    assert [capped.capacity((s, s)) for s in (32, 112, 224, 1024)] == [16, 8, 2, 1]


def test_ordered_writes_collect_in_submission_order_within_the_bound() -> None:
    """Results come back in submission order even when later futures finish first, and at most ``limit`` stay
    outstanding after a settle."""
    from concurrent.futures import Future

    seen: list[tuple[str, int]] = []
    writes = protect.OrderedWrites(lambda kind, value: seen.append((kind, value)))
    futures: list[Future] = [Future() for _ in range(4)]
    for i, future in enumerate(futures):
        writes.add("batch" if i < 3 else "end", future)
    futures[2].set_result(2)
    writes.settle(4)
    assert seen == [] and len(writes) == 4  # the oldest is not done: nothing is collected out of order
    futures[0].set_result(0)
    futures[1].set_result(1)
    futures[3].set_result(3)
    writes.settle(4)
    assert seen == [("batch", 0), ("batch", 1), ("batch", 2), ("end", 3)] and len(writes) == 0


# --------------------------------------------------------------------------------------------------- single process


def test_every_key_once_with_metadata_and_eps_bound_on_written_files(corpus: dict[str, Path]) -> None:
    inputs, outputs = read_samples(corpus["train"]), read_samples(corpus["reference"])
    assert set(outputs) == set(inputs) and len(inputs) == 65
    for key, out in outputs.items():
        src = inputs[key]
        assert out["__shard__"] == src["__shard__"]
        assert out["cls"] == src["cls"]
        assert "png" in out and "jpg" not in out
        meta_in, meta_out = json.loads(src["json"]), json.loads(out["json"])
        assert meta_out["identity"] == meta_in["identity"]
        assert meta_out["protected"]["format"] == "png"
        assert (
            meta_out["protected"]["generator_sha256"]
            == read_json(corpus["generator"].with_suffix(".json"))["weights_sha256"]
        )
        assert meta_out["protected"]["label"] == int(src["cls"])
        diff = np.abs(as_array(image_bytes(out)) - as_array(image_bytes(src)))
        assert diff.max() <= EPS_LEVELS, key
        assert diff.max() > 0  # the generator did perturb
    manifest = read_json(corpus["reference"] / protect.MANIFEST_NAME)
    assert manifest["balanced"] and manifest["samples_in"] == manifest["samples_out"] == 65
    assert manifest["eps_bound_holds"] is True and manifest["measured_max_abs"] <= EPS_LEVELS
    assert read_json(corpus["reference"] / "sizes.json") == read_json(corpus["train"] / "sizes.json")
    assert (corpus["reference"] / "labels.json").read_bytes() == (corpus["train"] / "labels.json").read_bytes()
    for stats_file in corpus["reference"].glob(f"*{protect.STATS_SUFFIX}"):
        stats = read_json(stats_file)
        assert stats["eps_bound_holds"] is True and stats["max_abs_delta"] <= EPS_LEVELS
        assert 0 < stats["mean_abs_delta"] <= EPS_LEVELS and stats["psnr_mean"] > 30


def test_rerun_of_finished_set_changes_nothing(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(corpus["reference"], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    summary, manifest = protect.protect(
        protect.ProtectOptions(str(corpus["generator"]), str(corpus["train"]), str(out), batch_size=4, progress=False)
    )
    assert summary.shards_skipped == 4 and not summary.stats
    assert manifest is not None and manifest["balanced"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before


def test_refuses_out_equal_to_in(corpus: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    before = tar_bytes(corpus["train"])
    assert run_protect(corpus["generator"], corpus["train"], corpus["train"] / ".." / "train") == 2
    assert "--out must differ from --in" in capsys.readouterr().err
    from segue_dist.cli import main as cli_main

    argv = ["protect", "--generator", str(corpus["generator"]), "--in", str(corpus["train"])]
    assert cli_main([*argv, "--out", str(corpus["train"]), "--no-progress"]) == 2
    assert tar_bytes(corpus["train"]) == before


def test_resume_refuses_other_settings(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(corpus["reference"], out)
    assert run_protect(corpus["generator"], corpus["train"], out, "--format", "jpeg") == 2
    assert "format='png'" in capsys.readouterr().err


def test_refuses_foreign_shards_in_out(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(corpus["train"], out)  # an input set, not a protect output
    assert run_protect(corpus["generator"], corpus["train"], out) == 2
    assert "not written by segue protect" in capsys.readouterr().err


def test_jpeg_output_reports_measured_bound(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "jpeg"
    assert run_protect(corpus["generator"], corpus["train"], out, "--format", "jpeg", "--jpeg-quality", "90") == 0
    inputs, outputs = read_samples(corpus["train"]), read_samples(out)
    measured = max(
        int(np.abs(as_array(fields["jpg"]) - as_array(image_bytes(inputs[key]))).max())
        for key, fields in outputs.items()
    )
    manifest = read_json(out / protect.MANIFEST_NAME)
    assert manifest["format"] == "jpeg" and manifest["jpeg_quality"] == 90
    assert manifest["eps_bound_holds"] is None
    assert manifest["measured_max_abs"] == measured
    for stats_file in out.glob(f"*{protect.STATS_SUFFIX}"):
        assert read_json(stats_file)["eps_bound_holds"] is None


def test_sidecar_labels_feed_the_generator(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    inputs = read_samples(corpus["train"])
    pseudo = {key: (int(fields["cls"]) + 1) % NUM_CLASSES for key, fields in inputs.items()}
    sidecar = tmp_path / "pseudo_labels.json"
    write_sidecar(sidecar, pseudo, NUM_CLASSES)
    out = tmp_path / "out"
    assert run_protect(corpus["generator"], corpus["train"], out, "--labels", str(sidecar)) == 0
    outputs = read_samples(out)
    for key, fields in outputs.items():
        assert json.loads(fields["json"])["protected"]["label"] == pseudo[key]
        assert fields["cls"] == inputs[key]["cls"]  # the true label is kept, only G's side information changed
    reference = read_samples(corpus["reference"])
    assert any(image_bytes(outputs[k]) != image_bytes(reference[k]) for k in outputs)  # other codes, other δ
    too_many = tmp_path / "k9.json"
    write_sidecar(too_many, pseudo, 9)
    assert run_protect(corpus["generator"], corpus["train"], tmp_path / "out9", "--labels", str(too_many)) == 2
    assert "K=9" in capsys.readouterr().err


def test_generator_with_too_few_classes_is_a_clear_error(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    small = make_generator(tmp_path / "gen3", 3)
    assert run_protect(small, corpus["train"], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "labels up to 4" in err and "codes only 3" in err
    # Legal with the explicit flag: labels just index the 16-bit codes.
    assert run_protect(small, corpus["train"], tmp_path / "out", "--allow-unseen-labels") == 0


def test_new_identities_are_coded_after_the_generators_classes(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    """--new-identities: identity i of a set G never saw gets code num_classes + i, recorded per sample and in the
    resume context; the true label is kept; a set too large for G's codes is a one-line error naming the limit."""
    small = make_generator(tmp_path / "gen3", 3)
    out = tmp_path / "new"
    assert run_protect(small, corpus["train"], out, "--new-identities") == 0
    inputs, outputs = read_samples(corpus["train"]), read_samples(out)
    for key, fields in outputs.items():
        assert json.loads(fields["json"])["protected"]["label"] == int(inputs[key]["cls"]) + 3
        assert fields["cls"] == inputs[key]["cls"]
    assert "different label map" not in capsys.readouterr().out  # no warning: the codes are deliberately new
    assert read_json(out / protect.MANIFEST_NAME)["balanced"]
    tiny = make_generator(tmp_path / "gen_tiny", 3, bits=2)  # 4 codes: 3 trained, 1 free for the 5 identities
    assert run_protect(tiny, corpus["train"], tmp_path / "new_tiny", "--new-identities") == 2
    assert "codes only 1 after its 3 training identities" in capsys.readouterr().err


def test_generator_trained_on_other_labels_warns_but_runs(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    other = make_generator(tmp_path / "gen_other", NUM_CLASSES, {f"someone {i}": i for i in range(NUM_CLASSES)})
    assert run_protect(other, corpus["train"], tmp_path / "out") == 0  # cross-dataset use is legal
    assert "different label map" in capsys.readouterr().out
    assert read_json(tmp_path / "out" / protect.MANIFEST_NAME)["balanced"]


# ------------------------------------------------------------------------------------------------------ bad inputs


def test_bad_samples_are_quarantined_or_converted_and_the_manifest_balances(tmp_path: Path) -> None:
    rgb = noise_image(32, 32, 0)
    jpeg = encode_jpeg(rgb, 95)
    cmyk = pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG")
    rgba = np.concatenate([noise_image(36, 44, 1), np.full((36, 44, 1), 128, np.uint8)], axis=2)
    meta = json.dumps({"identity": "x"}).encode()

    def sample(key: str, ext: str, data: bytes, label: str = "1") -> dict[str, bytes | str]:
        return {"__key__": key, ext: data, "cls": label.encode(), "json": meta}

    good = {
        "good_png": sample("good_png", "png", encode_png(rgb)),
        "good_jpg": sample("good_jpg", "jpg", jpeg),
        "cmyk": sample("cmyk", "jpg", cmyk),
        "rgba": sample("rgba", "png", pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")),
        "gray": sample("gray", "png", pil_bytes(Image.fromarray(rgb[:, :, 0], "L"), "PNG")),
        "big": sample("big", "png", encode_png(noise_image(40, 40, 2))),
        "nonsquare": sample("nonsquare", "png", encode_png(noise_image(36, 44, 3))),
    }
    bad = {
        "truncated": (sample("truncated", "jpg", jpeg[: len(jpeg) // 2]), "truncated"),
        "text": (sample("text", "jpg", b"this is not a picture, it is text\n"), "not an image"),
        "empty": (sample("empty", "jpg", b""), "empty file"),
        "bomb": (sample("bomb", "png", png_with_header_size(60_000, 60_000)), "too large"),
        "tiny": (sample("tiny", "png", encode_png(noise_image(6, 6, 4))), "too small"),
        "no_image": ({"__key__": "no_image", "cls": b"1", "json": meta}, "no image"),
        "bad_label": (sample("bad_label", "png", encode_png(rgb), "99"), "label 99 outside"),
        "no_label": (sample("no_label", "png", encode_png(rgb), "abc"), "non-integer .cls"),
    }
    order = ["good_png", "truncated", "cmyk", "text", "rgba", "empty", "big", "bomb", "gray", "tiny"]
    order += ["nonsquare", "no_image", "good_jpg", "bad_label", "no_label"]
    everything = {**good, **{k: v[0] for k, v in bad.items()}}
    split = tmp_path / "in"
    write_split(
        split,
        {"00000.tar": [everything[k] for k in order], "00001.tar": [sample("other", "png", encode_png(rgb))]},
        {"a": 0, "b": 1},
    )
    generator = make_generator(tmp_path / "gen", 2)
    out = tmp_path / "out"
    assert run_protect(generator, split, out, "--batch-size", "2") == 0

    written = read_samples(out)
    assert set(written) == {*good, "other"}
    inputs = {k: everything[k] for k in good}
    for key, fields in inputs.items():
        original = as_array(image_bytes(fields))  # CMYK/alpha/gray: the RGB decode_image makes of it
        protected = as_array(written[key]["png"])
        assert protected.shape == original.shape and np.abs(protected - original).max() <= EPS_LEVELS, key

    stats = read_json(out / "00000._stats.json")
    reasons = {q["key"]: q["reason"] for q in stats["quarantined_samples"]}
    assert set(reasons) == set(bad)
    for key, (_, expected) in bad.items():
        assert expected in reasons[key], (key, reasons[key])
    assert stats["written"] == len(good) and stats["quarantined"] == len(bad) and stats["read"] == 15

    manifest = read_json(out / protect.MANIFEST_NAME)
    assert manifest["balanced"] and manifest["samples_in"] == 16
    assert manifest["samples_out"] == len(good) + 1 and manifest["quarantined"] == len(bad)
    lines = (out / protect.QUARANTINE_NAME).read_text().splitlines()
    assert {json.loads(line)["key"] for line in lines} == set(bad)


def middle_member(path: Path) -> tarfile.TarInfo:
    """The middle image member of a shard (its header offset and data offset tell where to cut)."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))]
    return members[len(members) // 2]


def test_truncated_input_shards_fail_the_manifest_loudly(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    split = tmp_path / "in"
    shutil.copytree(corpus["train"], split)
    # Cut just before a member's header, a tar stream simply ends early with no error at all: only the balance
    # against sizes.json can notice. Cut inside a member, the reader reports the fault.
    silent, noisy = (split / "00001.tar").read_bytes(), (split / "00002.tar").read_bytes()
    (split / "00001.tar").write_bytes(silent[: middle_member(split / "00001.tar").offset])
    inside = middle_member(split / "00002.tar")
    assert inside.size > 100
    (split / "00002.tar").write_bytes(noisy[: inside.offset_data + 100])
    out = tmp_path / "out"
    assert run_protect(corpus["generator"], split, out) == 1
    err = capsys.readouterr().err
    assert "unaccounted" in err
    manifest = read_json(out / protect.MANIFEST_NAME)
    assert not manifest["balanced"]
    assert any("00001.tar" in p for p in manifest["problems"]) and any("00002.tar" in p for p in manifest["problems"])
    assert [e["shard"] for e in manifest["shard_errors"]] == ["00002.tar"]
    assert manifest["samples_in"] == 65 and manifest["samples_out"] < 65
    assert run_protect(corpus["generator"], split, out) == 1  # a rerun stays loud, it does not paper over it


def test_gpu_codec_needs_cuda(corpus: dict[str, Path], tmp_path: Path) -> None:
    opts = protect.ProtectOptions(
        str(corpus["generator"]), str(corpus["train"]), str(tmp_path / "out"), device="cpu", gpu_codec=True
    )
    with pytest.raises(ValueError, match="--gpu-codec needs a CUDA device"):
        protect.Protector(opts)


def test_gpu_codec_path_logic_runs_on_cpu(tmp_path: Path) -> None:
    """The --gpu-codec path (undecoded JPEG bytes through the loader, batched decode, fallback to the careful CPU
    decoder, encode + verify by torchvision) with a GpuCodec on the CPU device: torchvision's CPU codecs stand in
    for nvJPEG. The options stay valid (no gpu_codec flag on a CPU run); the codec is attached, as the job would."""
    rgb = noise_image(32, 32, 0)
    jpeg = encode_jpeg(rgb, 95)
    meta = json.dumps({"identity": "x"}).encode()
    samples = [
        {"__key__": "jpg", "jpg": jpeg, "cls": b"0", "json": meta},
        {"__key__": "gray", "jpg": pil_bytes(Image.fromarray(rgb[:, :, 0], "L"), "JPEG"), "cls": b"1", "json": meta},
        {"__key__": "cmyk", "jpg": pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "cls": b"1", "json": meta},
        {"__key__": "png", "png": encode_png(rgb), "cls": b"1", "json": meta},
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 2], "cls": b"1", "json": meta},
        {"__key__": "nolabel", "jpg": jpeg, "json": meta},
    ]
    split = tmp_path / "in"
    write_split(split, {"00000.tar": samples}, {"a": 0, "b": 1})
    generator = make_generator(tmp_path / "gen", 2)
    for fmt in ("png", "jpeg"):
        out = tmp_path / fmt
        protector = protect.Protector(
            protect.ProtectOptions(str(generator), str(split), str(out), format=fmt, workers=1, progress=False)
        )
        assert protector.codec is None  # a CPU run without --gpu-codec
        protector.codec = protect.GpuCodec(protector.device, protector.spec)  # torchvision's codecs on the CPU
        summary = protector.run()
        assert protect.finalize_if_complete(protector.shard_set, out) is not None
        stats = summary.stats[0]
        assert stats["written"] == 4 and stats["quarantined"] == 2, stats
        reasons = {q["key"]: q["reason"] for q in stats["quarantined_samples"]}
        assert "truncated" in reasons["truncated"] and "cls" in reasons["nolabel"]
        written = read_samples(out)
        for sample in samples[:4]:
            original = as_array(image_bytes(sample))  # type: ignore[arg-type]
            protected = as_array(image_bytes(written[str(sample["__key__"])]))
            bound = np.abs(protected - original).max()
            assert bound <= EPS_LEVELS if fmt == "png" else bound <= stats["measured_max_abs"]


# ---------------------------------------------------------------------------------------------------- multi-process


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop(protect.TEST_DELAY_ENV, None)
    env.update(extra)
    return env


@pytest.mark.slow
def test_two_ranks_give_every_key_once_and_identical_bytes(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "two_ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "segue_dist.protect", "--generator", str(corpus["generator"]), "--in", str(corpus["train"])]
    cmd += ["--out", str(out), "--no-progress", "--workers", "1"]  # the reference ran with 2 loader workers
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = {
        read_json(p)["shard"]: (read_json(p)["rank"], read_json(p)["world_size"]) for p in out.glob("*._stats.json")
    }
    assert ranks == {"00000.tar": (0, 2), "00001.tar": (1, 2), "00002.tar": (0, 2), "00003.tar": (1, 2)}
    assert set(read_samples(out)) == set(read_samples(corpus["train"]))
    assert tar_bytes(out) == tar_bytes(corpus["reference"])
    manifest = read_json(out / protect.MANIFEST_NAME)
    assert manifest["balanced"] and manifest["written_by_rank"] == {k: v[0] for k, v in ranks.items()}


@pytest.mark.slow
def test_kill_9_then_rerun_is_byte_identical(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "segue_dist.protect", "--generator", str(corpus["generator"])]
    # Batches of 4 (5 per shard, each followed by the test delay) give the kill a window inside a shard.
    cmd += ["--in", str(corpus["train"]), "--out", str(out), "--no-progress", "--workers", "1", "--threads", "1"]
    cmd += ["--batch-size", "4"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(**{protect.TEST_DELAY_ENV: "0.25"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches its loader workers, and nothing else
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*._stats.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # into the next shard's batches
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = list(out.glob("*._stats.json"))
    assert 1 <= len(finished) < 4, "the kill must land between the first and the last shard"
    assert not (out / protect.MANIFEST_NAME).exists()
    assert list(out.glob(".*.tmp")), "a shard was in progress: its temporary file is left behind"

    summary, manifest = protect.protect(
        protect.ProtectOptions(str(corpus["generator"]), str(corpus["train"]), str(out), batch_size=4, progress=False)
    )
    assert summary.shards_skipped == len(finished)
    assert manifest is not None and manifest["balanced"]
    assert not list(out.glob(".*.tmp"))
    # One G thread and one loader worker before the kill, the defaults after it and for an uninterrupted run with
    # the same batch size: a batch is fixed by its shard alone and runs on one intra-op thread, so the bytes agree.
    uninterrupted = tmp_path / "uninterrupted"
    assert run_protect(corpus["generator"], corpus["train"], uninterrupted, "--batch-size", "4", "--workers", "2") == 0
    assert tar_bytes(out) == tar_bytes(uninterrupted)


# -------------------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_faces_glint24(faces_root: Path, tmp_path: Path) -> None:
    shards = tmp_path / "glint"
    cfg = ShardsConfig(src=str(faces_root / "glint24"), out=str(shards), size=[32], max_per_identity=4)
    cfg.samples_per_shard, cfg.workers = 40, 1
    build_shards(cfg, show_progress=False)
    train = shards / "train"
    labels = read_json(train / "labels.json")["labels"]
    assert len(list(train.glob("*.tar"))) == 3
    generator = make_generator(tmp_path / "gen", len(labels), labels)
    out = tmp_path / "out"
    assert run_protect(generator, train, out, "--workers", "2") == 0
    inputs, outputs = read_samples(train), read_samples(out)
    assert set(outputs) == set(inputs) and len(outputs) == 4 * len(labels)
    for key, fields in outputs.items():
        diff = np.abs(as_array(fields["png"]) - as_array(image_bytes(inputs[key])))
        assert 0 < diff.max() <= EPS_LEVELS
    manifest = read_json(out / protect.MANIFEST_NAME)
    assert manifest["balanced"] and manifest["eps_bound_holds"] and manifest["quarantined"] == 0
    assert manifest["psnr_mean"] > 30
