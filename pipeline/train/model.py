"""Loading a transformers CLIP (weights, tokenizer, pixel spec) and encoding images and texts."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .data import ImageSpec, preprocess

log = logging.getLogger(__name__)


def resolve_device(name: str) -> "torch.device":  # noqa: F821
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use device: cpu or auto")
    return dev


def autocast_dtype(precision: str, device: "torch.device") -> Optional["torch.dtype"]:  # noqa: F821
    """The autocast dtype for a precision setting on a device (None = plain fp32)."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; on CPU use bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: "torch.device", dtype: Optional["torch.dtype"]) -> contextlib.AbstractContextManager:  # noqa: F821
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _resolve_source(name: str) -> str:
    """A local folder as an absolute path (so the hub client never sees it), else the hub id as is."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


@dataclass
class Loaded:
    model: Any  # transformers CLIPModel
    tokenizer: Any
    spec: ImageSpec
    source: str  # where tokenizer/processor came from


def load_clip(model: str, from_config: Optional[dict[str, Any]] = None, seed: int = 0) -> Loaded:
    """Load a CLIPModel + tokenizer + pixel spec from a hub id or local folder.

    Args:
        model: Hub id or folder. With ``from_config`` only its tokenizer and image processor are used.
        from_config: CLIPConfig fields; builds a randomly initialised model (seeded by ``seed``).
        seed: Seed of the random initialisation.

    Raises:
        RuntimeError: the model cannot be loaded (the message names it and how to fix it).
    """
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    src = _resolve_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        if from_config is not None:
            torch.manual_seed(seed)
            net = CLIPModel(CLIPConfig(**from_config))
        else:
            net = CLIPModel.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"cannot load CLIP {model!r}: {e}. Use a hub id that is in the local cache (offline runs), "
            "or a folder written by save_pretrained (pipeline.tiny_models.build_tiny_clip makes one)."
        ) from None
    size = int(net.config.vision_config.image_size)
    local = Path(src)
    spec = ImageSpec.from_model_dir(local, size) if local.is_dir() else _hub_spec(src, size)
    if spec.size != size:
        log.warning("%s: processor crop %d differs from the vision tower's %d; using %d", model, spec.size, size, size)
        spec = ImageSpec(size, spec.mean, spec.std)
    return Loaded(net, tokenizer, spec, src)


def _hub_spec(model: str, size: int) -> ImageSpec:
    """Mean/std from a hub model's preprocessor config (cached); the CLIP defaults when there is none."""
    try:
        from huggingface_hub import hf_hub_download

        p = Path(hf_hub_download(model, "preprocessor_config.json"))
        return ImageSpec.from_model_dir(p.parent, size)
    except Exception as e:  # offline and not cached: CLIP's defaults are right for every OpenAI CLIP
        log.warning("%s: no preprocessor config (%s); using OpenAI CLIP mean/std", model, e)
        return ImageSpec(size)


def features(out: Any) -> "torch.Tensor":  # noqa: F821
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def tokenize(tokenizer: Any, texts: Sequence[str], model: Any) -> dict[str, "torch.Tensor"]:  # noqa: F821
    max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def encode_texts(loaded: Loaded, texts: Sequence[str], device: "torch.device", batch_size: int = 256,  # noqa: F821
                 dtype: Optional["torch.dtype"] = None) -> np.ndarray:  # noqa: F821
    """L2-normalised text embeddings, float32 [len(texts), dim]."""
    import torch

    out = []
    with torch.inference_mode(), autocast(device, dtype):
        for i in range(0, len(texts), batch_size):
            enc = {k: v.to(device) for k, v in tokenize(loaded.tokenizer, texts[i:i + batch_size], loaded.model).items()}
            f = features(loaded.model.get_text_features(**enc)).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu().numpy())
    dim = int(loaded.model.config.projection_dim)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def iter_image_batches(images: Sequence[bytes], spec: ImageSpec, batch_size: int
                       ) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Centre-cropped pixel batches and the indices they hold; undecodable images are left out (logged)."""
    for i in range(0, len(images), batch_size):
        arrs, idx = [], []
        for j in range(i, min(i + batch_size, len(images))):
            try:
                arrs.append(preprocess(images[j], spec))
                idx.append(j)
            except Exception as e:  # a corrupt eval image is reported by the caller, never fatal
                log.warning("image %d cannot be decoded (%s); left out", j, e)
        if arrs:
            yield np.stack(arrs), idx


def encode_images(loaded: Loaded, images: Sequence[bytes], device: "torch.device", batch_size: int = 64,  # noqa: F821
                  dtype: Optional["torch.dtype"] = None) -> tuple[np.ndarray, np.ndarray]:  # noqa: F821
    """L2-normalised image embeddings [n_ok, dim] and the boolean mask of decodable images."""
    import torch

    ok = np.zeros(len(images), bool)
    out = []
    with torch.inference_mode(), autocast(device, dtype):
        for pix, idx in iter_image_batches(images, loaded.spec, batch_size):
            f = features(loaded.model.get_image_features(pixel_values=torch.from_numpy(pix).to(device))).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu().numpy())
            ok[idx] = True
    dim = int(loaded.model.config.projection_dim)
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), ok
