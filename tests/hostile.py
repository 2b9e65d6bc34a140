"""A corpus of hostile image files, generated on the fly (nothing is shipped)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png_bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A valid-header greyscale PNG claiming w x h pixels (tiny on disk, huge when decoded)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * (w + 1) * 16, 9)  # only a few rows: the header is what counts
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected status)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    good = _jpeg(photo, quality=90)
    cmyk = _jpeg(photo.convert("CMYK"))
    png16 = io.BytesIO()
    Image.fromarray((rng.integers(0, 65535, (64, 80))).astype(np.uint16)).save(png16, format="PNG")
    pal = Image.new("P", (60, 50))
    pal.putpalette([i % 256 for i in range(768)])
    pal.info["transparency"] = 0
    palb = io.BytesIO()
    pal.save(palb, format="PNG", transparency=0)
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    la = io.BytesIO()
    Image.new("LA", (50, 40), (128, 200)).save(la, format="PNG")
    # EXIF orientation 6 (rotate 90 CW): stored 400x300 must come out portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg(photo, exif=exif.tobytes())
    return {
        "good.jpg": (good, "success"),
        "truncated.jpg": (good[: len(good) // 2], "failed_to_decode"),
        "zero.jpg": (b"", "failed_to_decode"),
        "bomb.png": (_png_bomb(), "failed_decompression_bomb"),
        "cmyk.jpg": (cmyk, "success"),
        "sixteen_bit.png": (png16.getvalue(), "success"),
        "palette_alpha.png": (palb.getvalue(), "success"),
        "animated.gif": (gif.getvalue(), "success"),
        "la.png": (la.getvalue(), "success"),
        "exif_rotated.jpg": (rotated, "success"),
        "text.jpg": (b"this is not an image, just text with a .jpg name\n", "failed_to_decode"),
    }


def write_hostile_folder(root: Path) -> dict[str, str]:
    """Image folder with hostile files and hostile class names; returns rel path -> expected status."""
    expected = {}
    files = hostile_files()
    for label in ("tomato leaf", "ünïcødé_Сорт", "..", "dots..and spaces "):
        d = root / label if label != ".." else root / "dotdot"
        d.mkdir(parents=True, exist_ok=True)
        for name, (data, status) in files.items():
            (d / name).write_bytes(data)
            expected[f"{d.name}/{name}"] = status
    return expected
