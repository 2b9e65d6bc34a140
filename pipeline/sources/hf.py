"""Hugging Face datasets (Hub id or local folder), streamed and spooled into parts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional

from ..recipe import HFSource, fingerprint
from .base import PartSpec, RawSample, SourceError, spool
from .files import image_cell_bytes

_LABEL_NAMES = ("label", "labels", "class", "class_name", "category", "species", "breed", "disease", "name")


def detect_columns(features: Any, src: HFSource) -> tuple[str, Optional[str], Any]:
    """Pick the image and label columns from the dataset features (recipe overrides win).

    Returns (image column, label column or None, ClassLabel feature or None).
    """
    from datasets import ClassLabel, Image, Value

    if features is None:
        raise SourceError(
            f"source {src.name!r}: {src.id} exposes no features in streaming mode; "
            "set image_column and label_column in the recipe (or streaming: false)"
        )
    names = list(features)
    image_col = src.image_column or next((c for c in names if isinstance(features[c], Image)), None)
    if image_col is None or image_col not in features:
        raise SourceError(
            f"source {src.name!r}: no image column in {src.id} (columns: {names}); set image_column in the recipe"
        )
    if src.label_column:
        if src.label_column not in features:
            raise SourceError(f"source {src.name!r}: label_column {src.label_column!r} not in {src.id} (columns: {names})")
        label_col = src.label_column
    elif src.caption_column:
        label_col = None
    else:
        label_col = next((c for c in names if isinstance(features[c], ClassLabel)), None)
        if label_col is None:
            strings = [c for c in names if isinstance(features[c], Value) and features[c].dtype in ("string", "large_string")]
            label_col = next((c for c in strings if c.lower() in _LABEL_NAMES), None)
        if label_col is None:
            raise SourceError(
                f"source {src.name!r}: no label column found in {src.id} (columns: {names}); "
                "set label_column (or caption_column for image-text data) in the recipe"
            )
    if src.caption_column and src.caption_column not in features:
        raise SourceError(f"source {src.name!r}: caption_column {src.caption_column!r} not in {src.id} (columns: {names})")
    cl = features[label_col] if label_col and isinstance(features[label_col], ClassLabel) else None
    return image_col, label_col, cl


def load(src: HFSource):
    from datasets import load_dataset

    try:
        return load_dataset(src.id, src.config, split=src.split, revision=src.revision, streaming=src.streaming)
    except Exception as e:  # datasets raises many types; all mean "cannot load this source"
        hint = " (HF_HUB_OFFLINE=1 is set: only local folders and cached datasets load)" if os.environ.get(
            "HF_HUB_OFFLINE") == "1" else ""
        raise SourceError(f"source {src.name!r}: cannot load {src.id!r} split {src.split!r}: {e}{hint}") from None


def iter_samples(src: HFSource) -> Iterator[RawSample]:
    from datasets import Image

    ds = load(src)
    image_col, label_col, cl = detect_columns(ds.features, src)
    ds = ds.cast_column(image_col, Image(decode=False))
    for i, row in enumerate(ds):
        if src.max_samples and i >= src.max_samples:
            break
        data, err = image_cell_bytes(row[image_col])
        label = row[label_col] if label_col else None
        if cl is not None and label is not None:
            label = cl.int2str(int(label)) if int(label) >= 0 else None
        yield RawSample(
            orig_id=f"{src.split}/{i}",
            label=None if label is None else str(label),
            data=data,
            caption=str(row[src.caption_column]) if src.caption_column and row[src.caption_column] is not None else None,
            error=err,
        )


def plan(src: HFSource, part_size: int, spool_dir: Path) -> list[PartSpec]:
    parts = spool(iter_samples(src), src.name, part_size, spool_dir / src.name, fingerprint(src, "hf-v1"))
    if not parts:
        raise SourceError(f"source {src.name!r}: {src.id} split {src.split!r} is empty")
    return parts
