"""Image decoding and normalisation: any input bytes -> RGB JPEG, shorter side = target size.

Errors never raise: :func:`process_image` returns a :class:`Processed` with a ``status`` and an
``error`` so the caller records the sample and goes on.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Truncated files must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

STATUS_OK = "success"


@dataclass
class Processed:
    status: str
    error: Optional[str] = None
    jpeg: Optional[bytes] = None
    width: Optional[int] = None
    height: Optional[int] = None
    orig_width: Optional[int] = None
    orig_height: Optional[int] = None
    sha256: Optional[str] = None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Every Pillow mode -> RGB; transparency is composited on white (not black)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the value range, not by clipping.
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 / hi if hi > 255 else 1.0
        im = Image.fromarray(np.clip(a * scale, 0, 255).astype("uint8"), mode="L")
    if im.mode == "F":
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        a = (a - lo) / (hi - lo) * 255 if hi > lo else a * 0
        im = Image.fromarray(a.astype("uint8"), mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")


def _target_size(w: int, h: int, short: int) -> tuple[int, int]:
    if min(w, h) <= short:
        return w, h  # never upscale
    if w <= h:
        return short, max(1, round(h * short / w))
    return max(1, round(w * short / h)), short


def process_image(
    data: Optional[bytes],
    image_size: int,
    quality: int = 92,
    max_pixels: int = 89_478_485,
) -> Processed:
    """Decode ``data``, fix orientation and mode, resize the shorter side to ``image_size``, re-encode.

    JPEG draft mode lets libjpeg decode straight at 1/2..1/8 scale when the photo is much larger than
    the target: that skips most of the decode work, which dominates ingest time.
    """
    if data is None or len(data) == 0:
        return Processed(status="failed_to_decode", error="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels
            im = Image.open(io.BytesIO(data))
            ow, oh = im.size
            if ow * oh > max_pixels:
                return Processed(
                    status="failed_decompression_bomb",
                    error=f"{ow}x{oh} = {ow * oh} pixels exceeds max_image_pixels={max_pixels}",
                )
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated: first frame
            if im.format == "JPEG":
                # Orientation swaps sides; draft keeps both >= the requested box, so ask in stored order.
                tw, th = _target_size(ow, oh, image_size)
                im.draft("RGB", (tw, th))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            # Orientation may have swapped the sides: compute the target on the upright image.
            w, h = im.size
            tw, th = _target_size(w, h, image_size)
            if (tw, th) != (w, h):
                im = im.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=None)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality, optimize=False)
            out = buf.getvalue()
    except Image.DecompressionBombError as e:
        return Processed(status="failed_decompression_bomb", error=str(e))
    except Image.DecompressionBombWarning as e:
        return Processed(status="failed_decompression_bomb", error=str(e))
    except UnidentifiedImageError:
        return Processed(status="failed_to_decode", error="not an image (unrecognised format)")
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in msg.lower() or "broken data stream" in msg.lower() else "decode error"
        return Processed(status="failed_to_decode", error=f"{kind}: {msg}")
    return Processed(
        status=STATUS_OK,
        jpeg=out,
        width=tw,
        height=th,
        orig_width=ow,
        orig_height=oh,
        sha256=hashlib.sha256(out).hexdigest(),
    )
