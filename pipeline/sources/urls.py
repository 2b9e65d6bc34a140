"""URL lists (CSV or parquet of url + label/caption), downloaded with img2dataset, then spooled.

img2dataset is told not to resize (ingest normalises every source the same way) and keeps its own
per-sample status, so every failed download becomes a recorded sample with its error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from ..recipe import URLSource, fingerprint
from .base import PartSpec, RawSample, SourceError, spool


def _download(src: URLSource, out: Path) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import checks for updates over the network
    try:
        from img2dataset import download
    except ImportError:
        raise SourceError(f"source {src.name!r} (kind: urls) downloads with img2dataset, which is not installed: "
                          'pip install "alive-factory[urls]", then pip uninstall -y dataclasses') from None

    fmt = "parquet" if src.path.endswith(".parquet") else "csv"
    extra = [src.label_column] if src.label_column else None
    download(
        url_list=src.path,
        output_folder=str(out),
        processes_count=src.processes,
        thread_count=src.threads,
        resize_mode="no",
        output_format="webdataset",
        input_format=fmt,
        url_col=src.url_column,
        caption_col=src.caption_column,
        save_additional_columns=extra,
        timeout=src.timeout,
        retries=src.retries,
        enable_wandb=False,
        number_sample_per_shard=1000,
        incremental_mode="incremental",
        compute_hash=None,
    )


def _iter_downloaded(src: URLSource, out: Path) -> Iterator[RawSample]:
    import webdataset as wds

    n = 0
    for side in sorted(out.glob("*.parquet")):
        meta = pq.read_table(side).to_pylist()
        tar = side.with_suffix(".tar")
        images = {}
        if tar.exists():
            for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
                images[s["__key__"]] = s.get("jpg") or s.get("png") or s.get("webp")
        for row in sorted(meta, key=lambda r: r["key"]):
            if src.max_samples and n >= src.max_samples:
                return
            n += 1
            label = row.get(src.label_column) if src.label_column else None
            caption = row.get("caption") if src.caption_column else None
            if row.get("status") == "success" and images.get(row["key"]) is not None:
                yield RawSample(orig_id=row["url"], label=None if label is None else str(label),
                                data=images[row["key"]], caption=caption)
            else:
                yield RawSample(orig_id=row["url"], label=None if label is None else str(label), caption=caption,
                                error=f"failed_to_download: {row.get('error_message') or row.get('status')}")


def plan(src: URLSource, part_size: int, spool_dir: Path, seed: int = 0) -> list[PartSpec]:
    if src.max_samples and src.sample == "stratified":
        raise SourceError(f"source {src.name!r}: sample: stratified is not supported for URL lists; use sample: first")
    if not Path(src.path).is_file():
        raise SourceError(f"source {src.name!r}: URL list {src.path} does not exist (fix 'path' in the recipe)")
    out = spool_dir / src.name / "img2dataset"
    out.mkdir(parents=True, exist_ok=True)
    _download(src, out)
    parts = spool(_iter_downloaded(src, out), src.name, part_size, spool_dir / src.name, fingerprint(src, "urls-v1"))
    if not parts:
        raise SourceError(f"source {src.name!r}: the URL list {src.path} has no rows")
    return parts
