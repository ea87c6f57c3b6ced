"""What `segue protect --keep-metadata` carries from an input photo to its protected copy, and what it never does.

By default folder mode writes pixels only: no EXIF, ICC, XMP, IPTC or text chunks (a published photo should not
leak where and with what it was taken). ``--keep-metadata`` keeps what a photo needs to look the same and what its
owner may want to keep, and still drops everything that locates a person or holds another copy of the face:

* kept: the ICC colour profile, when it describes the colour space the photo is written in (an RGB profile for RGB,
  a gray one for gray; a CMYK profile is dropped because the photo is written as RGB); EXIF IFD0 and the Exif
  sub-IFD (camera, lens, exposure, date and time);
* never kept: the GPS IFD; the EXIF thumbnail (IFD1: an *unprotected* copy of the face); the MakerNote (vendor
  blobs that often embed previews and serial numbers); the orientation tag (the pixels are written upright, so it
  would rotate them twice); XMP (may hold GPS and named face regions), IPTC and PNG text chunks.

Library code: no I/O. Pillow's ``Exif.tobytes`` writes IFD0 and its sub-IFDs only, never IFD1, which is what drops
the thumbnail; tests check the written bytes for a second JPEG start marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

GPS_IFD = 0x8825
EXIF_IFD = 0x8769
MAKER_NOTE = 0x927C
ORIENTATION = 0x0112
# Formats whose Pillow writers take ``exif=`` / ``icc_profile=`` (PIL format names).
EXIF_FORMATS = ("JPEG", "PNG", "WEBP")
ICC_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF")
# ICC header bytes 16..20: the profile's data colour space, and the written modes it fits.
ICC_SPACE_FOR_MODE = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY", "LA": b"GRAY", "I;16": b"GRAY"}
KEPT = "ICC profile (matching colour space), EXIF without GPS, thumbnail, MakerNote and orientation"


@dataclass(frozen=True)
class Metadata:
    """Metadata to write with a protected photo: ``icc`` profile bytes and ``exif`` bytes (TIFF structure), each
    None when absent or not kept."""

    icc: bytes | None = None
    exif: bytes | None = None

    def save_options(self, fmt: str, mode: str) -> dict[str, Any]:
        """Keyword arguments for ``Image.save`` in format ``fmt`` (PIL name) for an image of ``mode``."""
        options: dict[str, Any] = {}
        if self.icc and fmt in ICC_FORMATS and self.icc[16:20] == ICC_SPACE_FOR_MODE.get(mode):
            options["icc_profile"] = self.icc
        if self.exif and fmt in EXIF_FORMATS:
            options["exif"] = self.exif
        return options


NO_METADATA = Metadata()


def kept_metadata(img: Image.Image) -> Metadata:
    """The metadata ``--keep-metadata`` carries over from a decoded photo (see the module docstring)."""
    icc = img.info.get("icc_profile") or None
    try:
        exif = img.getexif()
        for tag in (GPS_IFD, ORIENTATION):
            exif.pop(tag, None)
        exif.get_ifd(EXIF_IFD).pop(MAKER_NOTE, None)
        exif_bytes = exif.tobytes() if len(exif) else None
    except Exception:  # noqa: BLE001 - a malformed EXIF block is dropped, never a reason to quarantine the photo
        exif_bytes = None
    return Metadata(icc, exif_bytes)
