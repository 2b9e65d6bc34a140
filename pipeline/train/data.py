"""Data for the train/eval stage: image preprocessing and the streamed webdataset training pipeline.

Preprocessing is Pillow + numpy (no torchvision): resize the shorter side, crop to the model's square
input, scale to [0, 1] and normalise with the model's mean/std, as CLIP's own processor does. The
training stream follows open_clip's ``get_wds_dataset``: seeded shard shuffle -> tar samples -> seeded
sample shuffle -> skip (resume) -> decode/preprocess -> batch. The order of raw samples depends only
on (seed, epoch), so a resumed run skips exactly the samples it already trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image

from ..stats import StageStats

if TYPE_CHECKING:
    from ..score.preprocess import ImageTransform

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation: the fallback when a model folder has no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RateLimitedLog:
    """Log the first few messages of a kind, then one in ``every`` (open_clip's log_and_continue habit)."""

    def __init__(self, logger: logging.Logger, first: int = 5, every: int = 1000):
        self.logger, self.first, self.every = logger, first, every
        self.counts: dict[str, int] = {}

    def warning(self, kind: str, msg: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= self.first or n % self.every == 0:
            self.logger.warning("%s (%s #%d)", msg, kind, n)
        else:
            self.logger.debug("%s (%s #%d)", msg, kind, n)


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: square side, mean and std per channel."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_transform(cls, t: "ImageTransform", fallback_size: Optional[int] = None) -> "ImageSpec":
        """Side, mean and std of a model's image transform (the scorer's reading of its processor).

        Args:
            t: the model's transform (:meth:`ImageTransform.from_processor`).
            fallback_size: side when the transform fixes none (the vision tower's size).
        """
        side = (t.crop or t.fixed_size or (None,))[0] or t.shortest_edge or fallback_size
        if side is None:
            raise ValueError("the image processor sets no crop or size, and no vision tower size was given")
        mean = t.mean or CLIP_MEAN
        std = t.std or CLIP_STD
        return cls(int(side), tuple(mean), tuple(std))  # type: ignore[arg-type]


def _crop_box(w: int, h: int, scale: float, ratio_jitter: tuple[float, float], rng: Optional[random.Random]
              ) -> tuple[float, float, float, float]:
    """A square-ish crop covering ``scale`` of the shorter side's square, centred unless ``rng`` is given."""
    side = min(w, h) * (scale ** 0.5)
    cw = ch = side
    if rng is not None:
        r = rng.uniform(*ratio_jitter)
        cw, ch = min(w, side * r ** 0.5), min(h, side / r ** 0.5)
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    else:
        x0, y0 = (w - cw) / 2, (h - ch) / 2
    return x0, y0, x0 + cw, y0 + ch


def preprocess(data: bytes, spec: ImageSpec, rng: Optional[random.Random] = None,
               scale: tuple[float, float] = (0.9, 1.0)) -> np.ndarray:
    """Decode JPEG/PNG bytes into a normalised float32 CHW array of ``spec.size`` squared.

    Args:
        data: Encoded image.
        spec: Target side, mean and std.
        rng: When given, a random resized crop (open_clip's train transform, area ``scale``); else a
            centre crop of the shorter side (the eval transform).
        scale: Area range of the random crop relative to the largest centred square.

    Raises:
        OSError / ValueError: the bytes are not a decodable image (callers count and skip the sample).
    """
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("RGB", (spec.size, spec.size))  # decode at reduced scale when the JPEG is much larger
    im = im.convert("RGB")
    w, h = im.size
    s = rng.uniform(*scale) if rng is not None else 1.0
    box = _crop_box(w, h, s, (3 / 4, 4 / 3), rng)
    im = im.resize((spec.size, spec.size), Image.Resampling.BICUBIC, box=box)
    arr = np.asarray(im, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- shards


def read_sizes(shard_dir: Path) -> dict[str, int]:
    """``sizes.json`` ({shard file name: samples}) next to the shards, validated against the folder."""
    p = shard_dir / "sizes.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found: the train stage reads the webdataset shards the write stage makes "
            "(run `alive build` with write.formats including webdataset first)"
        )
    sizes = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        raise ValueError(f"{p}: expected a JSON object {{shard name: sample count}}, got {type(sizes).__name__}")
    missing = sorted(n for n in sizes if not (shard_dir / n).is_file())
    if missing:
        raise FileNotFoundError(f"{p} lists shards that do not exist: {missing[:5]} (re-run the write stage)")
    sizes = {k: v for k, v in sorted(sizes.items()) if v > 0}
    if not sizes:
        raise ValueError(f"{p}: every shard is empty; nothing to train on")
    return sizes


def shards_fingerprint(shard_dir: Path, sizes: dict[str, int]) -> str:
    """Cheap identity of a shard set: names, counts, byte sizes and mtimes."""
    h = hashlib.sha256()
    for name, n in sorted(sizes.items()):
        st = (shard_dir / name).stat()
        h.update(f"{name}\x00{n}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class RawSample:
    key: str
    jpg: bytes
    caption: str
    pos: int = 0  # 1-based position in the epoch's shuffled stream: what a resumed run skips


class _ToRaw:
    """webdataset sample dict -> RawSample, or None (counted) when a member is missing or empty."""

    def __init__(self, stats: StageStats, warn: RateLimitedLog):
        self.stats, self.warn = stats, warn

    def __call__(self, sample: dict[str, Any]) -> Optional[RawSample]:
        self.stats.total += 1
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        img = sample.get("jpg") or sample.get("jpeg") or sample.get("png") or sample.get("webp")
        txt = sample.get("txt")
        if not img:
            self.stats.drop("missing_image", example=where)
            self.warn.warning("missing_image", f"{where}: no .jpg member; sample skipped")
            return None
        if txt is None:
            self.stats.drop("missing_caption", example=where)
            self.warn.warning("missing_caption", f"{where}: no .txt member; sample skipped")
            return None
        caption = txt.decode("utf-8", "replace").strip() if isinstance(txt, bytes) else str(txt).strip()
        if not caption:
            self.stats.drop("empty_caption", example=where)
            self.warn.warning("empty_caption", f"{where}: empty caption; sample skipped")
            return None
        return RawSample(key=str(key), jpg=bytes(img), caption=caption)


def raw_stream(shard_dir: Path, shards: list[str], seed: int, epoch: int, stats: StageStats,
               shuffle_buffer: int, skip: int = 0) -> Iterator[RawSample]:
    """Undecoded samples of one epoch in a deterministic shuffled order, skipping the first ``skip``.

    A tar that cannot be read is logged and counted (``unreadable_shard``) and the epoch goes on.
    """
    import webdataset as wds

    warn = RateLimitedLog(log)

    def handler(exn: Exception) -> bool:
        stats.drop("unreadable_shard", example=repr(exn)[:300])
        warn.warning("unreadable_shard", f"skipping unreadable tar data: {exn!r}")
        return True

    order = list(shards)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(shard_dir / s) for s in order]),
        wds.tarfile_to_samples(handler=handler),
        wds.shuffle(bufsize=shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed * 7919 + epoch),
    )
    to_raw = _ToRaw(stats, warn)
    for pos, sample in enumerate(pipeline, start=1):
        if pos <= skip:  # resume: consumed before the checkpoint; not even parsed
            continue
        raw = to_raw(sample)
        if raw is not None:
            raw.pos = pos
            yield raw


def batches(samples: Iterable[RawSample], batch_size: int) -> Iterator[list[RawSample]]:
    """Full batches only (contrastive loss wants a fixed number of negatives); the tail is dropped."""
    buf: list[RawSample] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield buf
            buf = []


@dataclass(frozen=True)
class CropSpec:
    """DINO's multi-crop: 2 global crops of the model's side and ``n_local`` smaller ones."""

    n_local: int
    local_size: int
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)


def _random_resized_box(w: int, h: int, scale: tuple[float, float], rng: random.Random
                        ) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box: area share in ``scale`` of the image, log-uniform ratio 3/4-4/3."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return x0, y0, x0 + cw, y0 + ch
    side = min(w, h)  # torchvision's fallback: the centre crop
    return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def _dino_view(im: Image.Image, side: int, scale: tuple[float, float], rng: random.Random, blur_p: float,
               solarize_p: float, spec: ImageSpec) -> np.ndarray:
    """One DINO augmentation (``DataAugmentationDINO``): random resized crop, flip, colour jitter
    (brightness/contrast 0.4, saturation 0.2; no hue shift) with p 0.8, grayscale with p 0.2, Gaussian
    blur (sigma 0.1-2) with ``blur_p``, solarisation with ``solarize_p``; then the model's normalisation."""
    from PIL import ImageEnhance, ImageFilter, ImageOps

    box = _random_resized_box(im.width, im.height, scale, rng)
    v = im.resize((side, side), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        jitter = [(ImageEnhance.Brightness, 0.4), (ImageEnhance.Contrast, 0.4), (ImageEnhance.Color, 0.2)]
        rng.shuffle(jitter)
        for enhancer, amount in jitter:
            v = enhancer(v).enhance(rng.uniform(1 - amount, 1 + amount))
    if rng.random() < 0.2:
        v = v.convert("L").convert("RGB")
    if rng.random() < blur_p:
        v = v.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0) * side / 224))
    if rng.random() < solarize_p:
        v = ImageOps.solarize(v, 128)
    arr = np.asarray(v, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def multi_crop(data: bytes, spec: ImageSpec, crops: CropSpec, rng: random.Random) -> list[np.ndarray]:
    """DINO's views of one encoded image: [global 1, global 2, local 1..n], each a normalised CHW array.

    Blur and solarisation follow DINO: global 1 always blurred, global 2 blurred with p 0.1 and
    solarised with p 0.2, local crops blurred with p 0.5. The blur radius is scaled from DINO's 224 px.

    Raises:
        OSError / ValueError: undecodable bytes (the caller counts and skips the sample).
    """
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("RGB", (spec.size, spec.size))
    im = im.convert("RGB")
    views = [_dino_view(im, spec.size, crops.global_scale, rng, 1.0, 0.0, spec),
             _dino_view(im, spec.size, crops.global_scale, rng, 0.1, 0.2, spec)]
    views += [_dino_view(im, crops.local_size, crops.local_scale, rng, 0.5, 0.0, spec) for _ in range(crops.n_local)]
    return views


def preprocess_batch(batch: list[RawSample], spec: ImageSpec, seed: int, epoch: int, stats: StageStats,
                     warn: RateLimitedLog, pool: Optional[Executor] = None, augment: bool = True
                     ) -> tuple[np.ndarray, list[str]]:
    """Decode a batch (threads: Pillow releases the GIL while decoding). Undecodable samples are dropped.

    The random crop of a sample is seeded by (seed, epoch, key), so it is the same on a resumed run.
    """
    pix, caps, _ = preprocess_batch_views(batch, spec, seed, epoch, stats, warn, pool, augment)
    return pix, caps


def preprocess_batch_views(batch: list[RawSample], spec: ImageSpec, seed: int, epoch: int, stats: StageStats,
                           warn: RateLimitedLog, pool: Optional[Executor] = None, augment: bool = True,
                           crops: Optional[CropSpec] = None
                           ) -> tuple[np.ndarray, list[str], Optional[list[np.ndarray]]]:
    """:func:`preprocess_batch` plus, with ``crops``, DINO's views of the same samples.

    Returns:
        (pixels [n, 3, S, S], captions, views or None): ``views[v]`` holds view ``v`` of every kept
        sample ([n, 3, s_v, s_v]; the two global views first). The views of a sample are seeded by
        (seed, epoch, key) like its crop, so a resumed run cuts the same ones.
    """

    def one(s: RawSample) -> Optional[tuple[np.ndarray, Optional[list[np.ndarray]]]]:
        rng = random.Random(f"{seed}:{epoch}:{s.key}") if augment else None
        try:
            arr = preprocess(s.jpg, spec, rng)
            views = multi_crop(s.jpg, spec, crops, random.Random(f"dino:{seed}:{epoch}:{s.key}")) if crops else None
            return arr, views
        except Exception as e:  # any decoder error: one bad sample never kills a run
            stats.drop("failed_to_decode", example=f"{s.key}: {e}")
            warn.warning("failed_to_decode", f"sample {s.key}: cannot decode image ({e}); skipped")
            return None

    mapper: Callable = pool.map if pool is not None else map
    results = list(mapper(one, batch))
    keep = [i for i, a in enumerate(results) if a is not None]
    stats.kept += len(keep)
    if not keep:
        return np.zeros((0, 3, spec.size, spec.size), np.float32), [], None
    pix = np.stack([results[i][0] for i in keep])
    views = None
    if crops is not None:
        views = [np.stack([results[i][1][v] for i in keep]) for v in range(2 + crops.n_local)]
    return pix, [batch[i].caption for i in keep], views
