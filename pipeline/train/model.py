"""Loading a transformers CLIP to train (weights, tokenizer, pixel spec); encoding for eval is the scorer's.

Device, precision and the model's image transform come from the modules scoring uses
(:mod:`pipeline.devices`, :class:`pipeline.score.preprocess.ImageTransform`), so a model is seen the
same way when it is scored, trained and evaluated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..devices import autocast, autocast_dtype, resolve_device  # noqa: F401  (the train loop's imports)
from ..score.preprocess import ImageTransform
from .data import ImageSpec

log = logging.getLogger(__name__)


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
    spec = ImageSpec.from_transform(_transform(src, model), size)
    if spec.size != size:
        log.warning("%s: processor crop %d differs from the vision tower's %d; using %d", model, spec.size, size, size)
        spec = ImageSpec(size, spec.mean, spec.std)
    return Loaded(net, tokenizer, spec, src)


def _transform(src: str, model: str) -> ImageTransform:
    """The model's own image transform, read the one way every stage reads it (the scorer's)."""
    from transformers import AutoImageProcessor

    try:
        return ImageTransform.from_processor(AutoImageProcessor.from_pretrained(src))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load the image processor of {model!r}: {e}. Save one next to the model "
                           "(train/final and train/base have preprocessor_config.json)") from None


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
