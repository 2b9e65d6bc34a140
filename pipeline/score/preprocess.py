"""Fast image preprocessing for the scorer: JPEG bytes -> model pixels, without the processor's overhead.

The ingest stage already stored every image as an RGB JPEG whose shorter side is the recipe's
``image_size``, so all that is left is the model's own transform: resize, center crop, rescale and
normalise. :class:`ImageTransform` reads those settings from the model's image processor and does
the geometric part with Pillow on uint8 data (one resize per image, JPEG draft mode when the stored
image is at least twice the target) and the arithmetic part on the whole batch at once. The result
matches ``AutoImageProcessor`` output (tested in tests/test_score_preprocess.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

# Pillow's resampling filters by the integer ids transformers stores in preprocessor_config.json.
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class PreprocessError(ValueError):
    """An image that cannot be turned into model input (the message says why)."""


def _size_value(size: Any, key: str) -> Optional[int]:
    if size is None:
        return None
    v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(v) if v is not None else None


@dataclass(frozen=True)
class ImageTransform:
    """The geometric and arithmetic steps of a transformers image processor, as plain values.

    Attributes:
        shortest_edge: resize so the shorter side has this length (aspect kept), or None.
        fixed_size: resize to exactly (height, width) (SigLIP-style), or None.
        resample: Pillow resampling filter id.
        crop: center crop (height, width), or None.
        rescale: factor applied to uint8 values (1/255), or None.
        mean: per-channel mean after rescale, or None (no normalisation).
        std: per-channel std after rescale.
    """

    shortest_edge: Optional[int]
    fixed_size: Optional[tuple[int, int]]
    resample: int
    crop: Optional[tuple[int, int]]
    rescale: Optional[float]
    mean: Optional[tuple[float, float, float]]
    std: Optional[tuple[float, float, float]]

    @classmethod
    def from_processor(cls, proc: Any) -> "ImageTransform":
        """Read the transform from a transformers image processor (CLIP, SigLIP and alike)."""
        size = getattr(proc, "size", None)
        shortest = fixed = None
        if getattr(proc, "do_resize", True) and size is not None:
            shortest = _size_value(size, "shortest_edge")
            if shortest is None:
                h, w = _size_value(size, "height"), _size_value(size, "width")
                if h is None or w is None:
                    raise ValueError(f"unsupported image processor size {size!r}: need shortest_edge or height+width")
                fixed = (h, w)
            elif _size_value(size, "longest_edge"):
                raise ValueError(f"unsupported image processor size {size!r}: longest_edge is not handled")
        crop = None
        if getattr(proc, "do_center_crop", False):
            cs = getattr(proc, "crop_size", None)
            crop = (_size_value(cs, "height"), _size_value(cs, "width"))
            if None in crop:
                raise ValueError(f"unsupported crop_size {cs!r}: need height and width")
        resample = getattr(proc, "resample", 2)
        resample = int(getattr(resample, "value", resample) if resample is not None else 2)
        rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else None
        mean = std = None
        if getattr(proc, "do_normalize", True):
            m, s = proc.image_mean, proc.image_std
            mean = tuple(float(x) for x in (m if isinstance(m, (list, tuple)) else [m] * 3))
            std = tuple(float(x) for x in (s if isinstance(s, (list, tuple)) else [s] * 3))
        return cls(shortest, fixed, resample, crop, rescale, mean, std)  # type: ignore[arg-type]

    # ----- geometry -----
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, computed as transformers does (floor of the long side)."""
        if self.fixed_size is not None:
            return self.fixed_size[1], self.fixed_size[0]
        if self.shortest_edge is None:
            return width, height
        s = self.shortest_edge
        if width <= height:
            return s, int(s * height / width)
        return int(s * width / height), s

    @property
    def output_hw(self) -> Optional[tuple[int, int]]:
        """(height, width) of every output image when it is fixed, else None."""
        if self.crop is not None:
            return self.crop
        return self.fixed_size

    def load(self, data: bytes) -> np.ndarray:
        """Decode one encoded image and apply resize + center crop; returns uint8 (H, W, 3).

        Raises:
            PreprocessError: the bytes do not decode or the result does not have the output size.
        """
        try:
            im = Image.open(io.BytesIO(data))
            tw, th = self.resized_size(*im.size)
            if im.format == "JPEG" and im.size[0] >= 2 * tw and im.size[1] >= 2 * th:
                # libjpeg decodes at 1/2..1/8 scale directly; only worth it (and only used) for large images.
                im.draft("RGB", (tw, th))
            im = im.convert("RGB") if im.mode != "RGB" else im
            if im.size != (tw, th):
                im = im.resize((tw, th), self.resample)
            if self.crop is not None:
                ch, cw = self.crop
                w, h = im.size
                top, left = (h - ch) // 2, (w - cw) // 2
                if top < 0 or left < 0:
                    # transformers pads with zeros when the crop is larger than the image.
                    canvas = Image.new("RGB", (max(w, cw), max(h, ch)))
                    canvas.paste(im, (max(0, -left), max(0, -top)))
                    im, w, h = canvas, canvas.size[0], canvas.size[1]
                    top, left = (h - ch) // 2, (w - cw) // 2
                im = im.crop((left, top, left + cw, top + ch))
            arr = np.asarray(im, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise PreprocessError(f"cannot decode image: {e or type(e).__name__}") from None
        want = self.output_hw
        if want is not None and arr.shape[:2] != tuple(want):
            raise PreprocessError(f"preprocessed image is {arr.shape[:2]}, expected {want}")
        return arr

    # ----- arithmetic -----
    def normalize(self, batch: np.ndarray) -> "Any":
        """uint8 (N, H, W, 3) -> float32 torch tensor (N, 3, H, W), rescaled and normalised in one pass."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(torch.float32)
        scale = self.rescale if self.rescale is not None else 1.0
        if self.mean is not None:
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            # (x * scale - mean) / std == x * (scale / std) - mean / std
            x = x * (scale / std) - (mean / std)
        elif scale != 1.0:
            x = x * scale
        return x.contiguous()

    def __call__(self, images: Sequence[bytes]) -> "Any":
        """Encoded images -> normalised batch tensor (raises on the first bad image)."""
        return self.normalize(np.stack([self.load(b) for b in images]))

    def describe(self) -> str:
        """One line for logs and fingerprints."""
        rs = _RESAMPLE_NAMES.get(self.resample, str(self.resample))
        return (f"resize={self.shortest_edge or self.fixed_size} {rs} crop={self.crop} rescale={self.rescale} "
                f"mean={self.mean} std={self.std}")
