"""A small synthetic face-identity corpus, so the main job runs on a fresh clone with no data.

Each identity has a stable appearance (face shape and skin tone, hair colour and style, eye spacing and colour,
mouth, background); each image varies pose, scale, lighting and sensor noise. A classifier learns the identities
well above chance from a few dozen images, which is what the protection has to defeat.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segue_dist.utils.seed import derive_seed


@dataclass(frozen=True)
class IdentityLook:
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    eyes: tuple[int, int, int]
    background: tuple[int, int, int]
    face_w: float
    face_h: float
    eye_gap: float
    eye_y: float
    mouth_w: float
    hair_style: int  # 0 short, 1 long, 2 fringe, 3 bald
    glasses: bool


def identity_look(identity: int, seed: int = 0) -> IdentityLook:
    rng = random.Random(derive_seed(seed, "look", identity))

    def colour(lo: int, hi: int) -> tuple[int, int, int]:
        return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))

    tone = rng.uniform(0.35, 1.0)
    skin = (int(90 + 150 * tone), int(60 + 130 * tone), int(40 + 110 * tone))
    return IdentityLook(
        skin=skin,
        hair=colour(10, 200),
        eyes=colour(20, 160),
        background=colour(40, 230),
        face_w=rng.uniform(0.46, 0.62),
        face_h=rng.uniform(0.60, 0.78),
        eye_gap=rng.uniform(0.16, 0.28),
        eye_y=rng.uniform(0.38, 0.48),
        mouth_w=rng.uniform(0.12, 0.28),
        hair_style=rng.randrange(4),
        glasses=rng.random() < 0.3,
    )


def render_face(look: IdentityLook, size: int, rng: random.Random) -> Image.Image:
    """One photo of an identity: the look plus this shot's pose, scale, light and noise."""
    scale = 4  # draw large and downsample, for antialiased edges
    s = size * scale
    # The backdrop drifts from shot to shot, so the identity is in the face, not only in the wall behind it.
    backdrop = tuple(int(0.65 * c + 0.35 * rng.randint(0, 255)) for c in look.background)
    img = Image.new("RGB", (s, s), backdrop)
    draw = ImageDraw.Draw(img)
    zoom = rng.uniform(0.9, 1.1)
    cx, cy = s * (0.5 + rng.uniform(-0.06, 0.06)), s * (0.52 + rng.uniform(-0.06, 0.06))
    fw, fh = s * look.face_w * zoom / 2, s * look.face_h * zoom / 2
    if look.hair_style == 1:
        draw.rectangle([cx - fw * 1.15, cy - fh * 0.9, cx + fw * 1.15, cy + fh * 0.9], fill=look.hair)
    if look.hair_style != 3:
        draw.ellipse([cx - fw * 1.08, cy - fh * 1.12, cx + fw * 1.08, cy + fh * 0.3], fill=look.hair)
    draw.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=look.skin)
    if look.hair_style == 2:
        draw.rectangle([cx - fw * 0.9, cy - fh * 0.95, cx + fw * 0.9, cy - fh * 0.55], fill=look.hair)
    ey = cy - fh + 2 * fh * look.eye_y
    gap = s * look.eye_gap * zoom / 2
    er = s * 0.035 * zoom
    for ex in (cx - gap, cx + gap):
        draw.ellipse([ex - er * 1.6, ey - er, ex + er * 1.6, ey + er], fill=(245, 245, 245))
        draw.ellipse([ex - er * 0.8, ey - er * 0.8, ex + er * 0.8, ey + er * 0.8], fill=look.eyes)
        if look.glasses:
            draw.ellipse(
                [ex - er * 2.6, ey - er * 2.2, ex + er * 2.6, ey + er * 2.2], outline=(20, 20, 20), width=scale * 2
            )
    nose = tuple(max(0, c - 35) for c in look.skin)
    draw.line([cx, ey + er * 2, cx - er, cy + fh * 0.25], fill=nose, width=scale * 2)
    mw, my = s * look.mouth_w * zoom / 2, cy + fh * 0.5
    smile = rng.uniform(-0.3, 1.0) * er * 2
    draw.arc([cx - mw, my - er * 2 - smile, cx + mw, my + er * 2], 10, 170, fill=(150, 40, 50), width=scale * 2)
    img = img.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, fillcolor=backdrop)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))
    arr = np.asarray(img, dtype=np.float32)
    light = rng.uniform(0.75, 1.2)
    tint = np.array([rng.uniform(0.92, 1.08) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 7), arr.shape)
    arr = arr * light * tint + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def identity_name(identity: int) -> str:
    return f"Demo Person {identity:02d}"


def generate_corpus(identities: int = 10, per_identity: int = 40, size: int = 64, seed: int = 0):
    """Yield (identity name, index, image) for the whole corpus, deterministically from the seed."""
    for identity in range(identities):
        look = identity_look(identity, seed)
        for index in range(per_identity):
            rng = random.Random(derive_seed(seed, "shot", identity, index))
            yield identity_name(identity), index, render_face(look, size, rng)
