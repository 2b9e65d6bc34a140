"""Source readers: a recipe source -> fixed-size parts of raw samples.

``plan(src, ...)`` lists the parts of a source (cheap: file listings, parquet footers, dataset
metadata, tar headers; only URL lists are downloaded and spooled into ``ingest/_raw``), each with a
fingerprint of exactly what it contains, and applies the source's label filters and sampling
(:mod:`.select`) where the rows' labels are known before reading.
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
    return planners[src.kind](src, part_size, spool_dir, seed)


def read(part: PartSpec) -> Iterator[RawSample]:
    from . import files, hf, synthetic, wds

    readers = {
        "files": files.read_files,
        "parquet_rows": files.read_parquet_rows,
        "synthetic": synthetic.read,
        "spool": files.read_spool,
        "hf_disk": hf.read_disk,
        "hf_stream": hf.read_stream,
        "wds_tar": wds.read_tar,
    }
    return readers[part.reader](part)
