"""Source readers: a recipe source -> fixed-size parts of raw samples.

``plan(src, ...)`` lists the parts of a source (cheap: file listings, row counts, or a spool of a
streamed dataset into ``ingest/_raw``), each with a fingerprint of exactly what it contains.
``read(part)`` yields the raw samples of one part; it runs inside an ingest worker process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..recipe import Source
from .base import PartSpec, RawSample, SourceError

__all__ = ["PartSpec", "RawSample", "SourceError", "plan", "read"]


def plan(src: Source, part_size: int, spool_dir: Path, seed: int = 0) -> list[PartSpec]:
    from . import files, hf, synthetic, urls, wds

    planners = {
        "imagefolder": files.plan_imagefolder,
        "parquet": files.plan_parquet,
        "synthetic": synthetic.plan,
        "hf": hf.plan,
        "webdataset": wds.plan,
        "urls": urls.plan,
    }
    return planners[src.kind](src, part_size, spool_dir)


def read(part: PartSpec) -> Iterator[RawSample]:
    from . import files, synthetic

    readers = {
        "files": files.read_files,
        "parquet_rows": files.read_parquet_rows,
        "synthetic": synthetic.read,
        "spool": files.read_spool,
    }
    return readers[part.reader](part)
