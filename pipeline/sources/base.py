"""Types shared by the source readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa

from ..store import write_parquet_atomic


class SourceError(ValueError):
    """A source that cannot be read at all (missing folder, no label column...): names the source and the fix."""


@dataclass
class RawSample:
    orig_id: str
    label: Optional[str]
    data: Optional[bytes] = None  # image bytes, or None with ``path`` set
    path: Optional[str] = None
    caption: Optional[str] = None
    error: Optional[str] = None  # set when the reader itself could not get the bytes


@dataclass
class PartSpec:
    source: str
    part: int
    reader: str  # files | parquet_rows | synthetic | spool
    args: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    count: int = 0


SPOOL_SCHEMA = pa.schema(
    [("orig_id", pa.string()), ("label", pa.string()), ("data", pa.binary()), ("caption", pa.string()),
     ("error", pa.string())]
)


def spool(samples: Iterator[RawSample], source: str, part_size: int, spool_dir: Path, fp_base: str) -> list[PartSpec]:
    """Cut a stream of raw samples into spooled parquet parts (img2dataset's reader does the same with feather).

    A part already spooled with the same content fingerprint is kept as it is.
    """
    from ..recipe import fingerprint

    spool_dir.mkdir(parents=True, exist_ok=True)
    parts: list[PartSpec] = []
    buf: list[RawSample] = []

    def flush() -> None:
        idx = len(parts)
        ids = [s.orig_id for s in buf]
        fp = fingerprint(fp_base, idx, ids, [len(s.data or b"") for s in buf])
        path = spool_dir / f"part-{idx:05d}.parquet"
        marker = spool_dir / f"part-{idx:05d}.fp"
        if not (path.exists() and marker.exists() and marker.read_text() == fp):
            table = pa.table(
                {
                    "orig_id": ids,
                    "label": [s.label for s in buf],
                    "data": [s.data for s in buf],
                    "caption": [s.caption for s in buf],
                    "error": [s.error for s in buf],
                },
                schema=SPOOL_SCHEMA,
            )
            write_parquet_atomic(path, table, compression="none")
            from ..store import write_text_atomic

            write_text_atomic(marker, fp)
        parts.append(PartSpec(source, idx, "spool", {"path": str(path)}, fp, len(buf)))
        buf.clear()

    for s in samples:
        buf.append(s)
        if len(buf) >= part_size:
            flush()
    if buf:
        flush()
    return parts
