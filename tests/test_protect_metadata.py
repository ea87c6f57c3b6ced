"""`segue protect --keep-metadata` (folder mode): the ICC profile and camera EXIF survive, GPS, the EXIF thumbnail
(an unprotected copy of the face), the MakerNote and the orientation tag never do; without the flag the written
photo carries pixels only."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms
from test_protect import make_generator

from segue_dist import protect
from segue_dist.protect.metadata import GPS_IFD, ORIENTATION, Metadata
from segue_dist.utils.io import read_json

SOI = b"\xff\xd8"  # JPEG start-of-image: a second one in the file is an embedded (thumbnail) JPEG


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_with_gps_and_thumbnail(thumbnail: bytes) -> bytes:
    """Little-endian EXIF as cameras write it: IFD0 (Make, Orientation 6, GPS pointer), a GPS IFD, and IFD1 holding
    a JPEG thumbnail. Hand-built because Pillow's own writer never writes IFD1."""

    def ifd(entries: list[tuple[int, int, int, bytes]], next_ifd: int) -> bytes:
        body = b"".join(
            struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0") for tag, kind, count, value in entries
        )
        return struct.pack("<H", len(entries)) + body + struct.pack("<I", next_ifd)

    ifd0_at, make_at, gps_at, ifd1_at, thumb_at = 8, 50, 56, 74, 104
    ifd0 = ifd(
        [(0x010F, 2, 6, struct.pack("<I", make_at)), (ORIENTATION, 3, 1, struct.pack("<H", 6)),
         (GPS_IFD, 4, 1, struct.pack("<I", gps_at))],
        ifd1_at,
    )  # fmt: skip
    gps = ifd([(1, 2, 2, b"N\0")], 0)
    ifd1 = ifd([(0x0201, 4, 1, struct.pack("<I", thumb_at)), (0x0202, 4, 1, struct.pack("<I", len(thumbnail)))], 0)
    tiff = b"II*\0" + struct.pack("<I", ifd0_at) + ifd0 + b"Canon\0" + gps + ifd1
    assert len(tiff) == thumb_at
    return b"Exif\0\0" + tiff + thumbnail


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metadata")
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 30, (60, 80, 3)), 0, 255).astype(np.uint8)
    thumb = io.BytesIO()
    Image.fromarray(pixels).resize((16, 12)).save(thumb, format="JPEG", quality=80)
    inp = root / "in" / "alice"
    inp.mkdir(parents=True)
    exif = exif_with_gps_and_thumbnail(thumb.getvalue())
    Image.fromarray(pixels).save(inp / "camera.jpg", format="JPEG", quality=95, exif=exif, icc_profile=srgb_profile())
    Image.fromarray(pixels).save(inp / "plain.png", format="PNG", icc_profile=srgb_profile())
    return {"root": root, "in": root / "in", "generator": make_generator(root / "gen", num_classes=4)}


def protect_folder(photos: dict[str, Path], out: Path, *extra: str) -> Path:
    args = ["--generator", str(photos["generator"]), "--in", str(photos["in"]), "--out", str(out), "--no-progress"]
    assert protect.main([*args, *extra]) == 0
    return out


def test_the_input_really_has_gps_a_thumbnail_and_an_orientation(photos: dict[str, Path]) -> None:
    data = (photos["in"] / "alice" / "camera.jpg").read_bytes()
    assert data.count(SOI) == 2  # the photo and its thumbnail
    with Image.open(io.BytesIO(data)) as img:
        exif = img.getexif()
        assert exif[ORIENTATION] == 6 and exif.get_ifd(GPS_IFD) and img.size == (80, 60)


def test_keep_metadata_keeps_icc_and_camera_exif_and_never_gps_or_thumbnail(photos: dict[str, Path]) -> None:
    out = protect_folder(photos, photos["root"] / "kept", "--keep-metadata")
    data = (out / "alice" / "camera.jpg").read_bytes()
    assert data.count(SOI) == 1, "the EXIF thumbnail (an unprotected face) was copied"
    with Image.open(io.BytesIO(data)) as img:
        exif = img.getexif()
        assert img.info.get("icc_profile") == srgb_profile()
        assert exif.get(0x010F) == "Canon"
        assert GPS_IFD not in exif and not exif.get_ifd(GPS_IFD)
        assert ORIENTATION not in exif  # written upright: a kept tag would rotate it again
        assert img.size == (60, 80)
    with Image.open(out / "alice" / "plain.png") as img:
        assert img.info.get("icc_profile") == srgb_profile()
    assert read_json(out / protect.FOLDER_MANIFEST)["metadata"].startswith("kept")


def test_default_writes_pixels_only(photos: dict[str, Path]) -> None:
    out = protect_folder(photos, photos["root"] / "dropped")
    for name in ("camera.jpg", "plain.png"):
        with Image.open(out / "alice" / name) as img:
            assert "icc_profile" not in img.info and "exif" not in img.info and not img.getexif()
    assert read_json(out / protect.FOLDER_MANIFEST)["metadata"] == "dropped"


def test_a_resume_cannot_change_the_metadata_choice(
    photos: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = protect_folder(photos, photos["root"] / "switch")
    args = ["--generator", str(photos["generator"]), "--in", str(photos["in"]), "--out", str(out), "--no-progress"]
    assert protect.main([*args, "--keep-metadata"]) != 0
    assert "started with metadata='dropped'" in capsys.readouterr().err


def test_an_icc_profile_is_kept_only_for_the_colour_space_it_describes() -> None:
    rgb, cmyk = srgb_profile(), bytearray(srgb_profile())
    cmyk[16:20] = b"CMYK"
    assert Metadata(icc=rgb).save_options("JPEG", "RGB") == {"icc_profile": rgb}
    assert Metadata(icc=rgb).save_options("PNG", "L") == {}  # an RGB profile on a gray photo would mis-colour it
    assert Metadata(icc=bytes(cmyk)).save_options("JPEG", "RGB") == {}  # CMYK input is written as RGB
    assert Metadata(icc=rgb, exif=b"Exif\0\0").save_options("BMP", "RGB") == {}
