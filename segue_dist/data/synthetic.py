"""A small synthetic face-identity corpus, so the main job runs on a fresh clone with no data.

Identity is carried by geometry and texture, as in real faces: face shape (width, height, jaw taper), ear size,
eye spacing, height, size and shape, eyebrow thickness, tilt and arch, nose shape, length and width, mouth shape,
width, thickness and height, hair style and volume, glasses, facial hair, a mole at a fixed place and a freckle
pattern.

Colour is not a reliable cue. Each shot draws its own backdrop (a muted random colour and a random gradient),
shirt colour and iris colour, shifts the identity's hair colour and skin tone a long way (hue and brightness), and then
applies a random white balance, brightness, contrast, tint and side light to the whole photo. Two shots of one
identity therefore differ in mean colour more than two identities do on average. Each shot also varies pose (tilt,
shift, zoom, a little turn of the head), expression (smile, blink), blur and sensor noise, moves every proportion by
up to ``SHOT_TRAIT_JITTER`` of its between-identity range and redraws glasses, facial hair, hair style, nose and
mouth style with probability ``SHOT_REDRAW_P``, so that identities overlap the way real faces do.

Why: flat per-identity colours are a cue far simpler than any 8/255 perturbation, so a victim would learn them
from protected images anyway and no protection method could ever be measured beating it. With identity in shapes
a classifier needs several epochs to learn the identities (well above chance, well below perfect), which is the
real cue the protection has to defeat.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segue_dist.utils.seed import derive_seed

HAIR_STYLES = 7  # 0 short, 1 long, 2 fringe, 3 bald, 4 side parting, 5 curly, 6 tall top


@dataclass(frozen=True)
class IdentityLook:
    """What stays the same across all photos of one identity (fractions are of the image side or face box)."""

    skin_tone: float  # 0 dark .. 1 light, a central value: each shot shifts it a long way
    hair_shade: float  # 0 dark .. 1 light, likewise
    face_w: float
    face_h: float
    jaw: float  # 0 round chin .. 1 narrow, tapered chin
    ear: float
    eye_gap: float
    eye_y: float
    eye_size: float
    eye_aspect: float  # height / width of the eye
    brow_thick: float
    brow_tilt: float  # degrees, positive raises the outer ends
    brow_arch: float
    nose_style: int  # 0 line, 1 triangle, 2 round tip
    nose_len: float
    nose_w: float
    mouth_style: int  # 0 arc, 1 full lips, 2 straight line
    mouth_w: float
    mouth_y: float
    mouth_thick: float
    hair_style: int
    hair_volume: float
    glasses: int  # 0 none, 1 round, 2 square
    facial_hair: int  # 0 none, 1 moustache, 2 full beard, 3 goatee
    mole: tuple[float, float] | None  # position relative to the face centre, in face half-widths / half-heights
    freckles: tuple[tuple[float, float], ...]  # likewise


# Between-identity ranges of the continuous traits (fractions of the image side or face box, degrees for the tilt).
_TRAITS: dict[str, tuple[float, float]] = {
    "skin_tone": (0.2, 0.9),
    "hair_shade": (0.05, 0.8),
    "face_w": (0.40, 0.60),
    "face_h": (0.56, 0.76),
    "jaw": (0.0, 1.0),
    "ear": (0.06, 0.14),
    "eye_gap": (0.14, 0.30),
    "eye_y": (0.36, 0.50),
    "eye_size": (0.025, 0.05),
    "eye_aspect": (0.45, 0.9),
    "brow_thick": (0.012, 0.035),
    "brow_tilt": (-15.0, 15.0),
    "brow_arch": (0.0, 1.0),
    "nose_len": (0.12, 0.26),
    "nose_w": (0.04, 0.10),
    "mouth_w": (0.10, 0.28),
    "mouth_y": (0.62, 0.80),
    "mouth_thick": (0.012, 0.04),
    "hair_volume": (0.0, 1.0),
}
# Per shot, each continuous trait moves by up to this share of its between-identity range, and each categorical
# one (glasses, facial hair, hair style, nose and mouth style) is redrawn with this probability: people put on
# glasses, shave, change their hair, and a face's proportions in a photo move with pose and expression. This is
# what makes the identities as hard to tell apart as real faces, so that a victim needs many epochs.
SHOT_TRAIT_JITTER = 0.6
SHOT_REDRAW_P = 0.4
# The camera, per shot: side-light strength (brightness ramp across the image), white balance and exposure (relative
# ranges), contrast range, colour cast (levels per channel), sensor noise (sigma range, levels).
CAMERA_LIGHT = 0.25
CAMERA_BALANCE = 0.1
CAMERA_EXPOSURE = 0.2
CAMERA_CONTRAST = 0.15
CAMERA_CAST = 12.0
CAMERA_NOISE = (2.0, 5.0)
# Share of a random colour in the backdrop (the rest is mid-grey) and in the shirt: per-shot colour that is no cue.
# Muted, as behind aligned face crops: saturated random backdrops and shirts (0.4 / 1.0) put so much per-image
# colour into the image's corners that no coarse 8/255 pattern is learned before the identities (docs/measurements.md).
BACKDROP_COLOUR = 0.1
SHIRT_COLOUR = 0.1


def identity_look(identity: int, seed: int = 0) -> IdentityLook:
    rng = random.Random(derive_seed(seed, "look", identity))
    u = rng.uniform
    traits = {name: u(lo, hi) for name, (lo, hi) in _TRAITS.items()}
    mole = (u(-0.6, 0.6), u(-0.3, 0.6)) if rng.random() < 0.5 else None
    freckles = tuple((u(-0.55, 0.55), u(0.0, 0.35)) for _ in range(rng.randint(6, 12))) if rng.random() < 0.3 else ()
    return IdentityLook(
        **traits,
        nose_style=rng.randrange(3),
        mouth_style=rng.randrange(3),
        hair_style=rng.randrange(HAIR_STYLES),
        glasses=rng.choice((0, 0, 0, 1, 2)),
        facial_hair=rng.choice((0, 0, 0, 1, 2, 3)),
        mole=mole,
        freckles=freckles,
    )


def shot_look(look: IdentityLook, rng: random.Random) -> IdentityLook:
    """This shot's version of the look: every trait moved within its jitter, some categorical ones redrawn."""
    changes: dict[str, object] = {}
    for name, (lo, hi) in _TRAITS.items():
        value = getattr(look, name) + rng.uniform(-1, 1) * SHOT_TRAIT_JITTER * (hi - lo)
        # Stay within the drawable: a quarter of the range beyond it at most, never below half the smallest size.
        floor = max(lo - 0.25 * (hi - lo), 0.5 * lo if lo > 0 else lo - 0.25 * (hi - lo))
        changes[name] = min(max(value, floor), hi + 0.25 * (hi - lo))
    for name, choices in (
        ("glasses", (0, 1, 2)),
        ("facial_hair", (0, 1, 2, 3)),
        ("hair_style", tuple(range(HAIR_STYLES))),
        ("nose_style", (0, 1, 2)),
        ("mouth_style", (0, 1, 2)),
    ):
        if rng.random() < SHOT_REDRAW_P:
            changes[name] = rng.choice(choices)
    return dataclasses.replace(look, **changes)  # type: ignore[arg-type]


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(255 * r), int(255 * g), int(255 * b))


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)  # type: ignore[return-value]


def _backdrop(s: int, rng: random.Random) -> Image.Image:
    """A random colour with a random linear gradient to a second random colour: nothing identity-specific."""
    a = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32) * BACKDROP_COLOUR
    b = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32) * BACKDROP_COLOUR
    a, b = a + (1 - BACKDROP_COLOUR) * 128, b + (1 - BACKDROP_COLOUR) * 128
    strength, angle = rng.uniform(0.0, 0.4), rng.uniform(0.0, 2 * math.pi)
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    t = np.clip(0.5 + (xs * math.cos(angle) + ys * math.sin(angle)) * strength, 0.0, 1.0)[..., None]
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8), "RGB")


def render_face(look: IdentityLook, size: int, rng: random.Random) -> Image.Image:
    """One photo of an identity: the look's geometry plus this shot's colours, pose, expression, light and noise."""
    scale = 4  # draw large and downsample, for antialiased edges
    s = size * scale
    look = shot_look(look, rng)
    backdrop = _backdrop(s, rng)
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))  # the person, drawn opaque on a clear layer
    draw = ImageDraw.Draw(img)
    w = max(1, scale)

    # This shot's colours: skin tone and hair shifted far from the identity's central values.
    tone = min(max(look.skin_tone + rng.uniform(-0.3, 0.3), 0.05), 1.0)
    skin = _rgb(rng.uniform(0.02, 0.11), rng.uniform(0.25, 0.6) - 0.15 * tone, 0.3 + 0.65 * tone)
    shade = min(max(look.hair_shade + rng.uniform(-0.3, 0.3), 0.0), 1.0)
    hair = _rgb(
        rng.uniform(0.0, 0.15) if rng.random() < 0.8 else rng.random(), rng.uniform(0.2, 0.8), 0.1 + 0.8 * shade
    )
    brow = _shade(hair, rng.uniform(0.5, 0.8))
    iris = _rgb(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.6))
    shirt = tuple(int(128 + (rng.randint(0, 255) - 128) * SHIRT_COLOUR) for _ in range(3))
    lips = _rgb(rng.uniform(-0.04, 0.03), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.7))

    # Pose: position, zoom, and a small head turn that slides the features sideways within the face.
    zoom = rng.uniform(0.85, 1.12)
    cx, cy = s * (0.5 + rng.uniform(-0.07, 0.07)), s * (0.5 + rng.uniform(-0.07, 0.07))
    fw, fh = s * look.face_w * zoom / 2, s * look.face_h * zoom / 2
    turn = rng.uniform(-0.12, 0.12) * fw
    fx = cx + turn  # the centre line of the features

    # Neck and shoulders, in this shot's shirt.
    draw.rectangle([cx - fw * 0.45, cy + fh * 0.5, cx + fw * 0.45, cy + fh * 1.4], fill=_shade(skin, 0.85))
    draw.ellipse([cx - fw * 2.2, cy + fh * 1.15, cx + fw * 2.2, cy + fh * 2.6], fill=shirt)

    hv = 1.0 + 0.25 * look.hair_volume
    if look.hair_style == 1:  # long: falls behind the face to the shoulders
        draw.rectangle([cx - fw * 1.2 * hv, cy - fh * 0.7, cx + fw * 1.2 * hv, cy + fh * 1.2], fill=hair)
    # Ears.
    er_w, er_h = s * look.ear * zoom * 0.45, s * look.ear * zoom
    for side in (-1, 1):
        ex = cx + side * fw * 0.97
        draw.ellipse([ex - er_w, cy - fh * 0.05 - er_h, ex + er_w, cy - fh * 0.05 + er_h], fill=_shade(skin, 0.92))
    if look.hair_style in (0, 1, 2, 4, 6):  # a cap of hair over the top of the head
        top = fh * (1.12 + 0.15 * look.hair_volume + (0.35 if look.hair_style == 6 else 0.0))
        half = fw * (1.08 if look.hair_style != 6 else 0.75) * (hv if look.hair_style != 0 else 1.0)
        draw.ellipse([cx - half, cy - top, cx + half, cy + fh * 0.25], fill=hair)
    if look.hair_style == 5:  # curly: a ring of curls
        r = fw * (0.32 + 0.12 * look.hair_volume)
        for k in range(9):
            a = math.pi * (1.0 + k / 8)
            px, py = cx + fw * 1.0 * math.cos(a), cy - fh * 0.2 + fh * 0.9 * math.sin(a)
            draw.ellipse([px - r, py - r, px + r, py + r], fill=hair)

    # Face outline: an ellipse whose lower half tapers towards the chin by the identity's jaw.
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        c, sn = math.cos(t), math.sin(t)
        taper = 1.0 - 0.45 * look.jaw * max(sn, 0.0) ** 2
        pts.append((cx + fw * c * taper, cy + fh * sn))
    draw.polygon(pts, fill=skin)

    if look.hair_style == 2:  # fringe over the forehead
        draw.rectangle([cx - fw * 0.85, cy - fh * 0.95, cx + fw * 0.85, cy - fh * 0.5], fill=hair)
    if look.hair_style == 4:  # side parting: a sweep over one side of the forehead
        draw.polygon([(cx - fw * 0.95, cy - fh * 0.4), (cx - fw * 0.9, cy - fh * 0.95), (cx + fw * 0.6, cy - fh * 0.95),
                      (cx + fw * 0.1, cy - fh * 0.6)], fill=hair)  # fmt: skip

    # Freckles and mole at fixed places on the face.
    fr = max(1.0, s * 0.006)
    for dx, dy in look.freckles:
        px, py = fx + dx * fw, cy + dy * fh
        draw.ellipse([px - fr, py - fr, px + fr, py + fr], fill=_shade(skin, 0.72))
    if look.mole is not None:
        px, py, mr = fx + look.mole[0] * fw, cy + look.mole[1] * fh, s * 0.014
        draw.ellipse([px - mr, py - mr, px + mr, py + mr], fill=_shade(skin, 0.35))

    # Eyes and brows.
    ey = cy - fh + 2 * fh * look.eye_y
    gap = s * look.eye_gap * zoom / 2
    ew = s * look.eye_size * zoom
    eh = ew * look.eye_aspect * (0.2 if rng.random() < 0.1 else 1.0)  # the odd blink
    bt = max(w, int(s * look.brow_thick * zoom))
    for side in (-1, 1):
        ex = fx + side * gap
        draw.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=(240, 240, 235))
        ir = min(ew, eh) * 0.85
        draw.ellipse([ex - ir, ey - ir, ex + ir, ey + ir], fill=iris)
        draw.ellipse([ex - ir * 0.4, ey - ir * 0.4, ex + ir * 0.4, ey + ir * 0.4], fill=(15, 15, 15))
        by = ey - ew * 1.3 - eh * 0.5
        lift = math.tan(math.radians(look.brow_tilt)) * ew * 1.2
        inner, outer = (ex - side * ew * 1.2, by + lift * 0.5), (ex + side * ew * 1.2, by - lift * 0.5)
        mid = (ex, by - ew * 0.6 * look.brow_arch)
        draw.line([inner, mid, outer], fill=brow, width=bt, joint="curve")
        if look.glasses == 1:
            r = ew * 1.6
            draw.ellipse([ex - r, ey - r, ex + r, ey + r], outline=(20, 20, 20), width=w * 2)
        elif look.glasses == 2:
            draw.rectangle(
                [ex - ew * 1.7, ey - ew * 1.2, ex + ew * 1.7, ey + ew * 1.2], outline=(20, 20, 20), width=w * 2
            )
    if look.glasses:
        draw.line([(fx - gap + ew * 1.6, ey), (fx + gap - ew * 1.6, ey)], fill=(20, 20, 20), width=w * 2)

    # Nose.
    nose = _shade(skin, 0.7)
    ny0 = ey + eh
    ny1 = ny0 + s * look.nose_len * zoom
    nw = s * look.nose_w * zoom / 2
    if look.nose_style == 0:
        draw.line([(fx, ny0), (fx - nw * 0.6, ny1), (fx + nw * 0.4, ny1)], fill=nose, width=w * 2)
    elif look.nose_style == 1:
        draw.polygon([(fx, ny0), (fx - nw, ny1), (fx + nw, ny1)], fill=_shade(skin, 0.85), outline=nose)
    else:
        draw.line([(fx, ny0), (fx, ny1 - nw)], fill=nose, width=w * 2)
        draw.ellipse([fx - nw, ny1 - nw * 1.2, fx + nw, ny1 + nw * 0.4], fill=nose)

    # Facial hair (before the mouth, so the mouth stays visible).
    my = cy - fh + 2 * fh * look.mouth_y
    mw = s * look.mouth_w * zoom / 2
    beard = _shade(hair, 0.8)
    if look.facial_hair == 2:
        chin = cy + fh * 1.02
        draw.polygon([(cx - fw * 0.92, cy + fh * 0.05), (fx - mw * 1.3, my), (fx + mw * 1.3, my),
                      (cx + fw * 0.92, cy + fh * 0.05), (cx + fw * 0.55, chin - fh * 0.1), (cx, chin),
                      (cx - fw * 0.55, chin - fh * 0.1)], fill=beard)  # fmt: skip
    elif look.facial_hair == 3:
        draw.ellipse([fx - mw * 0.6, my + fh * 0.08, fx + mw * 0.6, cy + fh * 1.0], fill=beard)
    if look.facial_hair in (1, 2):
        draw.polygon([(fx - mw * 1.1, my - fh * 0.02), (fx, my - fh * 0.13), (fx + mw * 1.1, my - fh * 0.02),
                      (fx, my - fh * 0.07)], fill=beard)  # fmt: skip

    # Mouth: the identity's shape, this shot's smile.
    mt = max(w, int(s * look.mouth_thick * zoom))
    smile = rng.uniform(-0.3, 1.0) * fh * 0.12
    if look.mouth_style == 0:
        draw.arc([fx - mw, my - smile - mt, fx + mw, my + smile + mt], 10, 170, fill=lips, width=mt)
    elif look.mouth_style == 1:
        draw.ellipse([fx - mw, my - mt * 1.2, fx + mw, my + mt * 1.2 + smile * 0.5], fill=lips)
        draw.line([(fx - mw, my), (fx + mw, my)], fill=_shade(lips, 0.5), width=w)
    else:
        draw.line([(fx - mw, my), (fx, my + smile * 0.4), (fx + mw, my)], fill=lips, width=mt)

    img = img.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, center=(cx, cy))
    img = Image.alpha_composite(backdrop.convert("RGBA"), img).convert("RGB")
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7)))
    arr = np.asarray(img, dtype=np.float32)

    # The camera: side light, white balance, brightness, contrast, a colour cast, sensor noise.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0.0, CAMERA_LIGHT) * (xs * math.cos(angle) + ys * math.sin(angle))
    arr = arr * light[..., None]
    balance = np.array([rng.uniform(1 - CAMERA_BALANCE, 1 + CAMERA_BALANCE) for _ in range(3)], dtype=np.float32)
    arr = arr * balance * rng.uniform(1 - CAMERA_EXPOSURE, 1 + CAMERA_EXPOSURE)
    arr = (arr - 128.0) * rng.uniform(1 - CAMERA_CONTRAST, 1 + CAMERA_CONTRAST) + 128.0
    arr = arr + np.array([rng.uniform(-CAMERA_CAST, CAMERA_CAST) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(*CAMERA_NOISE), arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


def identity_name(identity: int) -> str:
    return f"Demo Person {identity:02d}"


def generate_corpus(identities: int = 10, per_identity: int = 40, size: int = 64, seed: int = 0):
    """Yield (identity name, index, image) for the whole corpus, deterministically from the seed."""
    for identity in range(identities):
        look = identity_look(identity, seed)
        for index in range(per_identity):
            rng = random.Random(derive_seed(seed, "shot", identity, index))
            yield identity_name(identity), index, render_face(look, size, rng)
