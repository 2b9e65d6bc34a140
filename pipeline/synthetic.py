"""Procedurally drawn, class-dependent images for demos and tests (always labelled synthetic).

Each class gets its own look (body colour, spot colour and density, stripes, background), derived
from a hash of its name, so a tiny CLIP can learn to tell classes apart. Each image varies position,
size, rotation and noise, deterministically from (seed, class, index).
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .describe.template import article

_COLOURS = {
    "green": (60, 150, 60), "yellow": (220, 200, 40), "brown": (120, 75, 30), "red": (190, 40, 40),
    "orange": (230, 130, 30), "black": (25, 25, 25), "white": (235, 235, 235), "grey": (128, 128, 128),
    "blue": (40, 80, 200), "purple": (120, 50, 150), "pink": (230, 140, 170), "teal": (30, 140, 140),
}
_COLOUR_NAMES = list(_COLOURS)


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def class_style(class_name: str, index: int) -> dict:
    """Visual recipe of a class: distinct across the classes of one source by construction."""
    words = class_name.lower()
    # Names that say their look get it (demo readability); the rest get a hashed but distinct style.
    body = next((c for c in _COLOUR_NAMES if c in words), _COLOUR_NAMES[(index * 5 + _h(class_name)) % 12])
    spot = _COLOUR_NAMES[(index * 7 + 3) % 12]
    if spot == body:
        spot = _COLOUR_NAMES[(index * 7 + 4) % 12]
    pattern = ["spots", "stripes", "plain", "rings"][index % 4]
    if "spot" in words or "blight" in words or "rust" in words:
        pattern = "spots"
    if "healthy" in words:
        pattern = "plain"
    bg = [(200, 180, 140), (90, 130, 70), (150, 190, 220), (80, 80, 80), (230, 220, 200)][(index // 4) % 5]
    return {"body": _COLOURS[body], "body_name": body, "spot": _COLOURS[spot], "spot_name": spot,
            "pattern": pattern, "bg": bg}


def _shape(draw: ImageDraw.ImageDraw, domain: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if domain == "fishery":
        draw.ellipse([cx - r, cy - r * 0.45, cx + r * 0.7, cy + r * 0.45], fill=fill)
        draw.polygon([(cx + r * 0.6, cy), (cx + r * 1.05, cy - r * 0.4), (cx + r * 1.05, cy + r * 0.4)], fill=fill)
    elif domain == "livestock":
        draw.rounded_rectangle([cx - r, cy - r * 0.5, cx + r, cy + r * 0.3], radius=r * 0.2, fill=fill)
        for dx in (-0.8, -0.45, 0.45, 0.8):
            draw.rectangle([cx + dx * r - r * 0.08, cy + r * 0.25, cx + dx * r + r * 0.08, cy + r * 0.85], fill=fill)
        draw.ellipse([cx - r * 1.35, cy - r * 0.75, cx - r * 0.75, cy - r * 0.15], fill=fill)
    elif domain == "crops":
        draw.ellipse([cx - r * 0.55, cy - r, cx + r * 0.55, cy + r], fill=fill)
        stem = fill if isinstance(fill, int) else (40, 90, 30)
        draw.line([(cx, cy - r), (cx, cy + r * 1.2)], fill=stem, width=max(1, int(r * 0.05)))
    else:
        draw.regular_polygon((cx, cy, r), n_sides=3 + _h(str(fill)) % 4, fill=fill)


def draw_image(class_name: str, class_index: int, domain: str, i: int, seed: int, size: int = 320) -> bytes:
    """One synthetic JPEG of class ``class_name`` (index ``class_index`` within its source)."""
    rng = np.random.default_rng(_h(seed, domain, class_name, i))
    st = class_style(class_name, class_index)
    bg = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in st["bg"])
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.28, 0.38)
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    cy = size / 2 + rng.uniform(-0.1, 0.1) * size
    body = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in st["body"])
    _shape(d, domain, cx, cy, r, body)
    mask = Image.new("L", (size, size), 0)
    _shape(ImageDraw.Draw(mask), domain, cx, cy, r, 255)
    tex = Image.new("RGB", (size, size), body)
    td = ImageDraw.Draw(tex)
    if st["pattern"] == "spots":
        for _ in range(int(rng.integers(8, 16))):
            x, y = rng.uniform(cx - r, cx + r), rng.uniform(cy - r, cy + r)
            s = size * rng.uniform(0.02, 0.05)
            td.ellipse([x - s, y - s, x + s, y + s], fill=st["spot"])
    elif st["pattern"] == "stripes":
        step = size * 0.08
        off = rng.uniform(0, step)
        for k in range(-12, 13):
            x = cx + k * step + off
            td.line([(x - r, cy - r), (x + r, cy + r)], fill=st["spot"], width=max(2, int(size * 0.025)))
    elif st["pattern"] == "rings":
        for k in range(1, 4):
            s = r * k / 4
            td.ellipse([cx - s, cy - s, cx + s, cy + s], outline=st["spot"], width=max(2, int(size * 0.02)))
    im.paste(tex, mask=mask)
    angle = float(rng.uniform(-25, 25))
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=bg)
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(radius=0.6))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def caption_for(class_name: str, class_index: int, domain: str, i: int, seed: int) -> str:
    """An 'original' caption for a synthetic captioned (general-pool) image."""
    st = class_style(class_name, class_index)
    forms = [
        "{a_body} {body}{cls} with {spot} {pattern}",
        "photo of {a_cls} {cls}, {body}with {spot} {pattern}",
        "{a_cls} {cls} on a plain background",
        "close-up of {a_body} {body}{cls}",
    ]
    f = forms[_h(seed, class_name, i, "cap") % len(forms)]
    pattern = st["pattern"] if st["pattern"] != "plain" else "no markings"
    body = "" if st["body_name"] in class_name else st["body_name"] + " "  # no "orange orange flower"
    return f.format(cls=class_name, body=body, spot=st["spot_name"], pattern=pattern,
                    a_cls=article(class_name), a_body=article(body or class_name))


def iter_synthetic(
    classes: list[str], per_class: int, domain: str, seed: int, size: int, captioned: bool
) -> Iterator[tuple[str, str, bytes, str | None]]:
    """Yield (orig_id, label, jpeg bytes, caption) in a fixed order (class-interleaved)."""
    for i in range(per_class):
        for ci, cls in enumerate(classes):
            cap = caption_for(cls, ci, domain, i, seed) if captioned else None
            yield f"{cls}/{i:06d}", cls, draw_image(cls, ci, domain, i, seed, size), cap
