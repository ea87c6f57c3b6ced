"""`segue protect` folder mode: every file accounted for, photos back at their own path, size, format, mode and
orientation, ε checked on the written files decoded by PIL directly, identical bytes on resume and across ranks,
and δ computed at the face scale (smooth at full size)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_protect import make_generator

from segue_dist import protect
from segue_dist.protect.folder_mode import FolderProtector
from segue_dist.protect.folder_records import load_journal, photo_labels
from segue_dist.protect.options import CodeRange
from segue_dist.protect.perturber import Perturber
from segue_dist.utils.io import read_json
from segue_dist.weights import load_generator

EPS = 8  # levels: floor(255 * 8/255)
FACES_PER_ID = 8
IDS = 3
# Inputs whose upright PIL mode differs from what is written: CMYK JPEG -> RGB, palette + transparency -> RGBA.
MODE_OUT = {"CMYK": "RGB", "P": "RGBA"}


def face_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth gradient plus mild noise (compresses and perturbs like a photo, not like pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 200 / width, yy * 200 / height, (xx + yy) * 100 / (width + height)], axis=2) + 30
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def save(img: Image.Image, path: Path, fmt: str, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kwargs)


def rotated_jpeg(path: Path) -> None:
    """A 60x40 (w x h) JPEG tagged EXIF orientation 6: upright it is 40x60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(face_like(40, 60, 7)), path, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif(path: Path) -> None:
    frames = [Image.fromarray(face_like(32, 32, s)).convert("P") for s in (1, 2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50)


def make_odd_files(root: Path) -> dict[str, str]:
    """Synthetic odd photos in identity folder ``odd/`` plus junk; returns relative path -> input mode."""
    odd = root / "odd"
    rgb = Image.fromarray(face_like(48, 40, 0))
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (48, 1)))
    save(rgb.convert("L"), odd / "gray.jpg", "JPEG", quality=95)
    save(rgb.convert("L"), odd / "gray.png", "PNG")
    save(Image.merge("LA", [rgb.convert("L"), alpha]), odd / "la.png", "PNG")
    save(Image.merge("RGBA", [*rgb.split(), alpha]), odd / "rgba.png", "PNG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save(palette, odd / "palette.png", "PNG", transparency=0)
    deep = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257 + 100).astype(np.uint16)
    save(Image.fromarray(deep), odd / "deep.png", "PNG")
    save(rgb.convert("CMYK"), odd / "cmyk.jpg", "JPEG", quality=95)
    save(rgb, odd / "name with spaces.v2.png", "PNG")
    save(rgb, odd / "José ü 顔.png", "PNG")
    save(Image.fromarray(face_like(200, 300, 3)), odd / "big.png", "PNG")
    rotated_jpeg(odd / "rotated.jpg")
    save(rgb, root / "loose.png", "PNG")  # no identity folder: quarantined
    (odd / "corrupt.jpg").write_bytes((odd / "gray.jpg").read_bytes()[:200])
    (odd / "empty.png").write_bytes(b"")
    animated_gif(odd / "anim.gif")
    for junk in (".DS_Store", "odd/._gray.jpg", "Thumbs.db", "odd/notes.txt"):
        (root / junk).write_bytes(b"junk")
    return {"gray.jpg": "L", "gray.png": "L", "la.png": "LA", "rgba.png": "RGBA", "palette.png": "P"}


QUARANTINED = {"loose.png", "odd/corrupt.jpg", "odd/empty.png", "odd/anim.gif"}
IGNORED = {".DS_Store", "odd/._gray.jpg", "Thumbs.db", "odd/notes.txt"}


def run_folder(generator: Path, inp: Path, out: Path, *extra: str) -> int:
    args = ["--generator", str(generator), "--in", str(inp), "--out", str(out), "--no-progress", "--threads", "2"]
    return protect.main([*args, *extra])


def pil_array(path: Path) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Decode with PIL alone (not the project's decoder): pixels as int32, mode, size (w, h)."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img).astype(np.int32), img.mode, img.size


def upright(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Odd synthetic files, plus IDS x FACES_PER_ID real LFW faces when the data is there, protected once."""
    root = tmp_path_factory.mktemp("folder")
    inp = root / "photos"
    make_odd_files(inp)
    faces = Path(os.environ.get("SEGUE_FACES", Path(__file__).resolve().parents[2] / "shared" / "data")) / "lfw423"
    if faces.is_dir():
        for ident in sorted(p for p in faces.iterdir() if p.is_dir())[:IDS]:
            (inp / ident.name).mkdir(parents=True)
            for face in sorted(ident.glob("*.jpg"))[:FACES_PER_ID]:
                shutil.copy(face, inp / ident.name / face.name)
    generator = make_generator(root / "gen", num_classes=8)
    out = root / "protected"
    assert run_folder(generator, inp, out) == 0
    return {"in": inp, "out": out, "generator": generator, "root": root}


def written_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and not p.relative_to(out).parts[0].startswith("_"))


# ----------------------------------------------------------------------------------------------------------- tests


def test_every_file_is_accounted_for_and_the_manifest_balances(tree: dict[str, Path]) -> None:
    manifest = read_json(tree["out"] / protect.FOLDER_MANIFEST)
    assert manifest["balanced"] is True
    assert manifest["files_in"] == manifest["written"] + manifest["quarantined"] + manifest["ignored"]
    assert {q["path"] for q in manifest["quarantined_files"]} == QUARANTINED
    assert {i["path"] for i in manifest["ignored_files"]} == IGNORED
    reasons = {q["path"]: q["reason"] for q in manifest["quarantined_files"]}
    assert "animated GIF (2 frames)" in reasons["odd/anim.gif"]
    assert "identity folder" in reasons["loose.png"]
    written = {p.relative_to(tree["out"]).as_posix() for p in written_files(tree["out"])}
    assert len(written) == manifest["written"]
    assert not written & (QUARANTINED | IGNORED)


def test_paths_sizes_and_formats_are_kept(tree: dict[str, Path]) -> None:
    for out_path in written_files(tree["out"]):
        rel = out_path.relative_to(tree["out"])
        src = upright(tree["in"] / rel)
        with Image.open(out_path) as written, Image.open(tree["in"] / rel) as original:
            assert written.format == original.format, rel  # JPEG stays JPEG, PNG stays PNG
            assert written.size == src.size, rel
            assert not written.info.get("exif") and not written.info.get("icc_profile"), rel  # metadata dropped
    assert (tree["out"] / "odd" / "José ü 顔.png").is_file()
    assert (tree["out"] / "odd" / "name with spaces.v2.png").is_file()


def test_modes_are_kept_alpha_identical_gray_stays_gray(tree: dict[str, Path]) -> None:
    odd_in, odd_out = tree["in"] / "odd", tree["out"] / "odd"
    for name in ("gray.jpg", "gray.png", "la.png", "rgba.png", "palette.png", "deep.png", "cmyk.jpg"):
        with Image.open(odd_in / name) as original, Image.open(odd_out / name) as written:
            assert written.mode == MODE_OUT.get(original.mode, original.mode), name
            if "A" in written.mode:  # alpha bit for bit (palette transparency as RGBA alpha)
                before = np.asarray(original.convert(written.mode))[..., -1]
                assert np.array_equal(np.asarray(written)[..., -1], before), name
    deep_in, _, _ = pil_array(odd_in / "deep.png")
    deep_out, mode, _ = pil_array(odd_out / "deep.png")
    assert mode == "I;16" and np.abs(deep_out - deep_in).max() <= EPS * 257
    assert np.abs(deep_out - deep_in).max() > 0  # perturbed, not copied


def test_eps_bound_on_every_lossless_file_decoded_by_pil(tree: dict[str, Path]) -> None:
    checked = 0
    for out_path in written_files(tree["out"]):
        rel = out_path.relative_to(tree["out"])
        if out_path.suffix.lower() != ".png" or rel.name == "deep.png":
            continue
        with Image.open(tree["in"] / rel) as original, Image.open(out_path) as written:
            mode = written.mode
            before = np.asarray(original.convert(mode), dtype=np.int32)
            after = np.asarray(written, dtype=np.int32)
        diff = np.abs(after - before)
        assert diff.max() <= EPS, (rel, int(diff.max()))
        assert diff.max() > 0, rel
        checked += 1
    assert checked >= 7
    manifest = read_json(tree["out"] / protect.FOLDER_MANIFEST)
    assert manifest["formats"]["PNG"]["eps_bound_holds"] is True
    assert manifest["formats"]["JPEG"]["eps_bound_holds"] is None  # lossy: measured, reported


def test_grayscale_jpeg_stays_black_and_white(tree: dict[str, Path]) -> None:
    arr, mode, _ = pil_array(tree["out"] / "odd" / "gray.jpg")
    rgb = np.asarray(Image.open(tree["out"] / "odd" / "gray.jpg").convert("RGB"), dtype=np.int32)
    assert mode == "L" and arr.ndim == 2
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_exif_rotated_jpeg_comes_back_upright(tree: dict[str, Path]) -> None:
    written = np.asarray(Image.open(tree["out"] / "odd" / "rotated.jpg"), dtype=np.float32)
    original = np.asarray(upright(tree["in"] / "odd" / "rotated.jpg"), dtype=np.float32)
    assert written.shape == original.shape == (60, 40, 3)
    assert np.abs(written - original).mean() < 4.0  # the same upright picture, not a rotated one


def test_resume_rewrites_exactly_the_deleted_outputs_with_identical_bytes(tree: dict[str, Path]) -> None:
    out = tree["root"] / "resume"
    shutil.copytree(tree["out"], out)
    files = written_files(out)
    deleted = files[::4]
    before = {p: p.read_bytes() for p in deleted}
    stamps = {p: p.stat().st_mtime_ns for p in files if p not in before}
    for p in deleted:
        p.unlink()
    assert run_folder(tree["generator"], tree["in"], out) == 0
    for p, data in before.items():
        assert p.read_bytes() == data, p
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # the others were skipped
    assert read_json(out / protect.FOLDER_MANIFEST)["balanced"] is True


def test_two_ranks_write_the_same_bytes_as_one(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tree["root"] / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert run_folder(tree["generator"], tree["in"], out) == 0
    one = {p.relative_to(tree["out"]): p.read_bytes() for p in written_files(tree["out"])}
    two = {p.relative_to(out): p.read_bytes() for p in written_files(out)}
    assert one == two
    assert read_json(out / protect.FOLDER_MANIFEST)["balanced"] is True


def test_one_thread_writes_the_same_bytes_as_two(tree: dict[str, Path]) -> None:
    """G runs per chunk of the sorted list (fixed by the input order), so the thread count cannot change a byte."""
    out = tree["root"] / "one_thread"
    assert run_folder(tree["generator"], tree["in"], out, "--threads", "1") == 0
    one = {p.relative_to(out): p.read_bytes() for p in written_files(out)}
    assert one == {p.relative_to(tree["out"]): p.read_bytes() for p in written_files(tree["out"])}


@pytest.mark.slow
def test_kill_9_then_rerun_is_byte_identical(tree: dict[str, Path]) -> None:
    """A real ``kill -9`` mid-run (chunks of 2, slowed down), then a rerun: byte-identical to an uninterrupted run
    with the same chunks, no temporary file left, the manifest balances."""
    flags = ["--batch-size", "2", "--threads", "1"]
    reference = tree["root"] / "kill_reference"
    assert run_folder(tree["generator"], tree["in"], reference, *flags) == 0
    out = tree["root"] / "killed"
    cmd = [sys.executable, "-m", "segue_dist.protect", "--generator", str(tree["generator"]), "--in", str(tree["in"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", protect.TEST_DELAY_ENV: "0.3"}
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress", *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(journalled(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = journalled(out)
    total = len(written_files(reference)) + len(QUARANTINED)
    assert 3 <= len(first) < total, "the kill must land mid-run"
    assert not (out / protect.FOLDER_MANIFEST).exists()
    assert run_folder(tree["generator"], tree["in"], out, *flags) == 0
    assert not list(out.rglob(".*.tmp"))
    got = {p.relative_to(out): p.read_bytes() for p in written_files(out)}
    assert got == {p.relative_to(reference): p.read_bytes() for p in written_files(reference)}
    assert read_json(out / protect.FOLDER_MANIFEST)["balanced"] is True


def test_bf16_and_fp32_differ_by_at_most_a_level_on_few_pixels(tree: dict[str, Path]) -> None:
    """``--precision bf16`` (folder mode's CPU default where the CPU has native bf16) is the same protection as
    fp32: lossless outputs differ by at most one level, on a small share of the pixels; the run records which."""
    outs = {}
    for precision in ("fp32", "bf16"):
        outs[precision] = tree["root"] / f"precision_{precision}"
        assert run_folder(tree["generator"], tree["in"], outs[precision], "--precision", precision) == 0
        assert read_json(outs[precision] / "_protect.json")["compute"] == f"cpu-{precision}-batch"
    pngs = [p.relative_to(outs["fp32"]) for p in written_files(outs["fp32"]) if p.suffix == ".png"]
    assert pngs
    differ, total = 0, 0
    for rel in pngs:
        a, _, _ = pil_array(outs["fp32"] / rel)
        b, _, _ = pil_array(outs["bf16"] / rel)
        assert np.abs(a - b).max() <= 1, rel
        differ, total = differ + int((a != b).sum()), total + a.size
    assert 0 < differ / total < 0.05  # > 0: bf16 really ran (its rounding flips a few pixels)


def test_chunks_are_cut_from_the_sorted_list_before_ranks_take_them(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """G's batches (chunks of --batch-size) are consecutive runs of the sorted photo list, whatever the rank count
    and whatever is done already; ranks take whole chunks round-robin, and together they take every photo once."""
    out = tree["root"] / "chunks"
    opts = protect.ProtectOptions(str(tree["generator"]), str(tree["in"]), str(out), batch_size=3, progress=False)
    photos = FolderProtector(opts).listing.photos
    expected = [photos[i : i + 3] for i in range(0, len(photos), 3)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    taken = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        protector = FolderProtector(opts)
        assert protector.chunks() == expected
        todo, to_write, skipped = protector.my_todo({})
        assert [chunk for chunk, _ in todo] == expected[rank::2] and skipped == 0
        assert all(write == set(chunk) for chunk, write in todo) and to_write == sum(map(len, expected[rank::2]))
        taken += [p for chunk, _ in todo for p in chunk]
    assert sorted(taken) == sorted(photos)


def journalled(out: Path) -> set[str]:
    """Paths the journal lists as handled (written or quarantined), from every rank's journal file."""
    return set(load_journal(out)) if out.is_dir() else set()


def test_batched_generator_matches_per_image_within_float_noise(tree: dict[str, Path]) -> None:
    """G over a batch is the same function as G over each image alone (up to float32 summation order), and bf16
    stays within a small fraction of a level of fp32: batching and bf16 are speed-ups, not other protections."""
    generator, _ = load_generator(tree["generator"])
    faces = torch.from_numpy(np.stack([face_like(48, 40, s) for s in range(6)]))
    labels = torch.arange(6) % 8
    fp32 = Perturber(generator, torch.device("cpu"), EPS, precision="fp32")
    per_image = torch.cat([fp32.deltas(faces[i : i + 1], labels[i : i + 1]) for i in range(6)])
    batched = fp32.deltas(faces, labels)
    assert per_image.abs().max() > 1e-3
    assert torch.allclose(per_image, batched, atol=1e-5)
    bf16 = Perturber(generator, torch.device("cpu"), EPS, precision="bf16").deltas(faces, labels)
    assert (bf16 - batched).abs().max() * 255 < 0.5  # under half a uint8 level


def test_labels_from_a_csv_mapping(tree: dict[str, Path]) -> None:
    mapping = tree["root"] / "labels.csv"
    mapping.write_text("path,identity\nodd/gray.png,alice\nloose.png,bob\n", encoding="utf-8")
    out = tree["root"] / "csv"
    assert run_folder(tree["generator"], tree["in"], out, "--labels", str(mapping)) == 0
    manifest = read_json(out / protect.FOLDER_MANIFEST)
    assert manifest["written"] == 2 and manifest["balanced"] is True
    assert (out / "loose.png").is_file() and (out / "odd" / "gray.png").is_file()


def high_frequency_share(delta: torch.Tensor) -> float:
    """Energy of the 4-neighbour Laplacian of δ (1, H, W, 3) relative to δ's own energy."""
    d = delta[0].permute(2, 0, 1)
    lap = 4 * d[:, 1:-1, 1:-1] - d[:, :-2, 1:-1] - d[:, 2:, 1:-1] - d[:, 1:-1, :-2] - d[:, 1:-1, 2:]
    return float(lap.pow(2).mean() / d.pow(2).mean().clamp_min(1e-12))


def test_face_scale_delta_is_smooth_at_full_size_and_within_eps(tree: dict[str, Path]) -> None:
    """δ computed at 50 px and upsampled to 300x200 has far less high-frequency energy than δ computed at full
    size; the written big.png (200 px short side > the 112 px default face size) stays within ε."""
    generator, _ = load_generator(tree["generator"])
    perturber = Perturber(generator, torch.device("cpu"), EPS)
    photo = face_like(200, 300, 3)
    assert protect.face_shape(200, 300, 50) == (50, 75)
    smooth = protect.face_scale_delta(photo, 1, perturber, face_size=50)
    full = protect.face_scale_delta(photo, 1, perturber, face_size=10_000)
    assert smooth.shape == full.shape == (1, 200, 300, 3)
    assert high_frequency_share(smooth) < 0.25 * high_frequency_share(full)
    big_in, _, _ = pil_array(tree["in"] / "odd" / "big.png")
    big_out, _, _ = pil_array(tree["out"] / "odd" / "big.png")
    assert 0 < np.abs(big_out - big_in).max() <= EPS


def test_real_lfw_faces_are_protected_as_jpeg(tree: dict[str, Path], faces_root: Path) -> None:
    manifest = read_json(tree["out"] / protect.FOLDER_MANIFEST)
    copied = [p for p in tree["in"].glob("*/*.jpg") if p.parent.name != "odd"]
    faces = [p for p in written_files(tree["out"]) if p.relative_to(tree["out"]).parts[0] != "odd"]
    assert len(faces) == len(copied) >= 2 * IDS
    for p in faces:
        with Image.open(p) as img:
            assert (img.format, img.size, img.mode) == ("JPEG", (250, 250), "RGB")
    assert manifest["formats"]["JPEG"]["files"] == len(copied) + 3  # + gray, cmyk, rotated
    assert manifest["formats"]["JPEG"]["psnr_mean"] > 35.0


def test_input_format_auto_detects_folders_and_shards(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "sizes.json").write_text("{}")
    opts = dict(generator="g", out=str(tmp_path / "o"))
    assert protect.is_folder_input(protect.ProtectOptions(inp=str(tmp_path / "photos"), **opts))
    assert not protect.is_folder_input(protect.ProtectOptions(inp=str(tmp_path / "split"), **opts))
    forced = protect.ProtectOptions(inp=str(tmp_path / "split"), input_format="folder", **opts)
    assert protect.is_folder_input(forced)


def test_folder_identities_are_numbered_after_the_generators_for_new_people() -> None:
    """--new-identities in folder mode: identity folders in sorted order get codes offset + 0, 1, ...; too many for
    G's codes is a one-line error naming what is left after its training identities."""
    photos = ["bob/1.jpg", "alice/1.jpg", "alice/2.jpg", "loose.jpg"]
    assert photo_labels(photos, None, CodeRange(5, 8, "")) == {"alice/1.jpg": 5, "alice/2.jpg": 5, "bob/1.jpg": 6}
    with pytest.raises(ValueError, match="codes 2 after its 6 training identities"):
        photo_labels(["a/1.jpg", "b/1.jpg", "c/1.jpg"], None, CodeRange(6, 8, ""))
