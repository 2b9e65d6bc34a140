"""Image and text encoders for scoring: transformers CLIP / SigLIP, loaded by hub id or local folder.

Device and precision are picked automatically: CUDA with fp16 when a GPU is present; on CPUs whose
flags include AMX or AVX512-BF16, bf16 (several times faster than fp32 there); plain fp32 otherwise
(on AVX2-only CPUs bf16 matmuls are emulated and slower than fp32). Text embeddings are cached per
caption so a class description shared by thousands of images is encoded once per process.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..devices import inference_dtype, resolve_device
from .preprocess import ImageTransform, PreprocessError

log = logging.getLogger(__name__)

TEXT_ROWS = 32  # rows of every text batch (fixed: see Encoder.encode_texts_uncached)
TEXT_BUCKET = 16  # text batches are padded to a multiple of this many tokens


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """Turn 'auto' settings into a concrete (device, dtype) pair such as ('cuda', 'fp16') or ('cpu', 'fp32')."""
    if device == "auto":
        device = resolve_device().type
    try:
        return device, inference_dtype("cuda" if device.startswith("cuda") else "cpu", dtype)
    except ValueError as e:
        raise ValueError(f"score.{e}") from None


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _l2n(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class Encoder:
    """A dual encoder (CLIP or SigLIP) with fast image preprocessing and a text-embedding cache.

    Args:
        model: hub id or local folder with the model, tokenizer and image processor.
        device: 'auto', 'cpu', 'cuda', 'cuda:1', ...
        dtype: 'auto', 'fp32', 'bf16' or 'fp16'.
        batch_size: images (and texts) per forward pass.
        text_cache_size: captions whose embeddings are kept in memory.
        compile: run the image tower through ``torch.compile`` (fused kernels; on a bf16 CPU about 1.5x
            the eager tower). Compiling takes tens of seconds once per process (less with inductor's
            on-disk cache), so it pays from a few thousand images. Every batch is then padded to
            ``batch_size`` rows: one fixed shape, compiled once.
    """

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64,
                 text_cache_size: int = 200_000, compile: bool = False):
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model_id = model
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.batch_size = batch_size
        try:
            self.model = AutoModel.from_pretrained(model, dtype=_torch_dtype(self.dtype))
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.image_processor = AutoImageProcessor.from_pretrained(model)
        except OSError as e:
            raise ValueError(
                f"model {model!r} could not be loaded ({e}); give a local folder or a hub id that is "
                "in the local cache (HF_HUB_OFFLINE=1 runs cannot download)"
            ) from None
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ValueError(f"model {model!r} ({type(self.model).__name__}) is not a dual image-text encoder")
        self.model.eval().to(self.device)
        self.model_type = getattr(self.model.config, "model_type", "")
        self.transform = ImageTransform.from_processor(self.image_processor)
        max_pos = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77)
        self.max_length = int(min(max_pos, getattr(self.tokenizer, "model_max_length", max_pos) or max_pos))
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = text_cache_size
        self._lock = threading.Lock()  # one forward pass at a time: tasks may share this encoder across threads
        self._torch = torch
        self.compiled = bool(compile)
        self._image_fn = self.model.get_image_features
        if self.compiled:
            self._image_fn = torch.compile(self.model.get_image_features, dynamic=False)
        self.cache_hits = 0
        self.cache_misses = 0

    # ----- images -----
    def _forward_images(self, pixels) -> np.ndarray:
        torch = self._torch
        n = len(pixels)
        if self.compiled and n < self.batch_size:
            # One shape for the compiled graph: a short batch is filled with copies of its first row.
            pixels = torch.cat([pixels, pixels[:1].expand(self.batch_size - n, *pixels.shape[1:])])
        with self._lock, torch.inference_mode():
            out = self._image_fn(pixel_values=pixels.to(self.device, _torch_dtype(self.dtype)))
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
            return feats[:n].float().cpu().numpy()

    def encode_images(self, images: Sequence[bytes], workers: int = 2) -> tuple[np.ndarray, list[Optional[str]]]:
        """Embed encoded images (JPEG/PNG bytes).

        Returns:
            (embeddings, errors): float32 L2-normalised rows for the images that decoded, in input
            order, and per input image None or the reason it could not be embedded.
        """
        errors: list[Optional[str]] = [None] * len(images)
        chunks: list[np.ndarray] = []

        def load(i: int) -> Optional[np.ndarray]:
            try:
                return self.transform.load(images[i])
            except PreprocessError as e:
                errors[i] = str(e)
                return None

        # Decode/resize of the next batch overlaps the forward pass of this one (Pillow releases the GIL).
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            batches = [range(s, min(len(images), s + self.batch_size)) for s in range(0, len(images), self.batch_size)]
            pending = [pool.map(load, b) for b in batches[:2]]
            for k in range(len(batches)):
                arrs = [a for a in pending[k] if a is not None]
                if k + 2 < len(batches):
                    pending.append(pool.map(load, batches[k + 2]))
                if arrs:
                    chunks.append(self._forward_images(self.transform.normalize(np.stack(arrs))))
        emb = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
        return _l2n(emb).astype(np.float32), errors

    # ----- texts -----
    def _text_length(self, text: str) -> int:
        """Padded length of a text: its own token count rounded up to a bucket (SigLIP: always max_length)."""
        if self.model_type.startswith("siglip"):
            # SigLIP was trained on max_length-padded text: other padding changes its embeddings.
            return self.max_length
        n = len(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
        return min(self.max_length, -(-n // TEXT_BUCKET) * TEXT_BUCKET)

    def encode_texts_uncached(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts (float32, L2-normalised) in fixed-shape batches.

        A text's embedding must not depend on which other texts share its batch: the cache makes
        batch composition depend on run history, and a resumed run must give the same bytes as an
        uninterrupted one. Every batch therefore has TEXT_ROWS rows (short batches are filled with
        repeats) padded to a length bucket chosen from the text alone; with identical shapes each
        row's result is bit-identical whatever its neighbours are.
        """
        torch = self._torch
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(texts):
            by_len.setdefault(self._text_length(t), []).append(i)
        for length in sorted(by_len):
            idx_all = by_len[length]
            for s in range(0, len(idx_all), TEXT_ROWS):
                idx = idx_all[s:s + TEXT_ROWS]
                batch = [texts[i] for i in idx]
                batch += [batch[0]] * (TEXT_ROWS - len(batch))
                tok = self.tokenizer(batch, padding="max_length", truncation=True, max_length=length,
                                     return_tensors="pt")
                with self._lock, torch.inference_mode():
                    res = self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()})
                    feats = res if isinstance(res, torch.Tensor) else res.pooler_output
                    out[idx] = feats.float().cpu().numpy()[: len(idx)]
        return _l2n(out).astype(np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, encoding each distinct text once and reusing cached embeddings."""
        uniq = list(dict.fromkeys(texts))
        missing = [t for t in uniq if t not in self._text_cache]
        self.cache_hits += len(uniq) - len(missing)
        self.cache_misses += len(missing)
        if missing:
            for t, e in zip(missing, self.encode_texts_uncached(missing)):
                self._text_cache[t] = e
            while len(self._text_cache) > self._cache_size:
                self._text_cache.popitem(last=False)
        table = {t: self._text_cache[t] for t in uniq}
        for t in uniq:
            self._text_cache.move_to_end(t)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([table[t] for t in texts])

    # ----- info -----
    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

    def describe(self) -> dict[str, str]:
        return {"model": self.model_id, "device": self.device, "dtype": self.dtype, "type": self.model_type,
                "preprocess": self.transform.describe(), "compiled": str(self.compiled)}


_ENCODERS: dict[tuple, Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64,
                compile: bool = False) -> Encoder:
    """A process-wide encoder per (model, device, dtype, compile): loaded once, its text cache shared by every part."""
    key = (str(Path(model).resolve()) if Path(model).exists() else model, device, dtype, bool(compile))
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(key)
        if enc is None:
            enc = Encoder(model, device, dtype, batch_size, compile=compile)
            log.info("score encoder: %s", enc.describe())
            _ENCODERS[key] = enc
        if not enc.compiled:  # a compiled encoder keeps the batch shape it was compiled for
            enc.batch_size = batch_size
        return enc
