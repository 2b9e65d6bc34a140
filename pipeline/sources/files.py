"""Local files: image folders (folder = class), parquet tables, and spooled parts."""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ..recipe import ImageFolderSource, ParquetSource, fingerprint
from .base import PartSpec, RawSample, SourceError


def _chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for i in range(0, len(items), size):
        yield i // size, items[i : i + size]


def plan_imagefolder(src: ImageFolderSource, part_size: int, spool_dir: Path) -> list[PartSpec]:
    root = Path(src.path)
    if not root.is_dir():
        raise SourceError(f"source {src.name!r}: image folder {root} does not exist (fix 'path' in the recipe)")
    entries: list[tuple[str, str, int, int]] = []  # rel path, label, size, mtime
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(cls_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                full = Path(dirpath) / fn
                st = full.stat()
                entries.append((str(full.relative_to(root)), cls_dir.name, st.st_size, st.st_mtime_ns))
    if not entries:
        raise SourceError(
            f"source {src.name!r}: no images under {root}; expected one sub-folder per class "
            f"(e.g. {root}/tomato_healthy/img001.jpg)"
        )
    if src.max_samples:
        entries = entries[: src.max_samples]
    base = fingerprint(src, "imagefolder-v1")
    return [
        PartSpec(src.name, i, "files", {"root": str(root), "entries": [(e[0], e[1]) for e in chunk]},
                 fingerprint(base, i, chunk), len(chunk))
        for i, chunk in _chunks(entries, part_size)
    ]


def read_files(part: PartSpec) -> Iterator[RawSample]:
    root = Path(part.args["root"])
    for rel, label in part.args["entries"]:
        p = root / rel
        try:
            data = p.read_bytes()
            yield RawSample(orig_id=rel, label=label, data=data)
        except OSError as e:
            yield RawSample(orig_id=rel, label=label, error=f"cannot read {p}: {e}")


def _parquet_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
    elif any(c in path for c in "*?["):
        files = sorted(globlib.glob(path, recursive=True))
    else:
        files = [path] if p.exists() else []
    return files


def plan_parquet(src: ParquetSource, part_size: int, spool_dir: Path) -> list[PartSpec]:
    files = _parquet_files(src.path)
    if not files:
        raise SourceError(f"source {src.name!r}: no parquet files at {src.path} (fix 'path' in the recipe)")
    base = fingerprint(src, "parquet-v1")
    parts: list[PartSpec] = []
    taken = 0
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except (OSError, pa.ArrowInvalid) as e:
            raise SourceError(f"source {src.name!r}: {f} is not a readable parquet file: {e}") from None
        names = meta.schema_arrow.names
        need = [c for c in (src.image_column, src.label_column, src.caption_column, src.id_column) if c]
        missing = [c for c in need if c not in names]
        if missing:
            raise SourceError(
                f"source {src.name!r}: {f} has no column(s) {missing}; its columns are {names}. "
                "Set image_column/label_column/caption_column in the recipe."
            )
        n = meta.metadata.num_rows
        if src.max_samples:
            n = min(n, src.max_samples - taken)
        st = os.stat(f)
        for start in range(0, n, part_size):
            stop = min(n, start + part_size)
            parts.append(PartSpec(
                src.name, len(parts), "parquet_rows",
                {"file": f, "start": start, "stop": stop, "image": src.image_column, "label": src.label_column,
                 "caption": src.caption_column, "id": src.id_column},
                fingerprint(base, f, st.st_size, st.st_mtime_ns, start, stop), stop - start,
            ))
        taken += n
        if src.max_samples and taken >= src.max_samples:
            break
    if not parts:
        shown = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
        raise SourceError(f"source {src.name!r}: the parquet file(s) at {src.path} hold no rows ({shown}); "
                          "fix 'path' or remove the source")
    return parts


def image_cell_bytes(v: object) -> tuple[Optional[bytes], Optional[str]]:
    """Image cell -> bytes. Accepts raw bytes or the Hugging Face {bytes, path} struct."""
    if v is None:
        return None, "image cell is null"
    if isinstance(v, (bytes, bytearray)):
        return bytes(v), None
    if isinstance(v, dict):
        if v.get("bytes"):
            return bytes(v["bytes"]), None
        if v.get("path") and Path(v["path"]).is_file():
            return Path(v["path"]).read_bytes(), None
        return None, f"image struct has no bytes and no readable path ({v.get('path')!r})"
    return None, f"unsupported image cell type {type(v).__name__}"


def _label_text(v: object) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def read_parquet_rows(part: PartSpec) -> Iterator[RawSample]:
    a = part.args
    cols = [c for c in (a["image"], a["label"], a["caption"], a["id"]) if c]
    pf = pq.ParquetFile(a["file"])
    start, stop = a["start"], a["stop"]
    row = 0
    for batch in pf.iter_batches(batch_size=256, columns=list(dict.fromkeys(cols))):
        n = batch.num_rows
        if row + n <= start:
            row += n
            continue
        d = batch.to_pydict()
        for j in range(n):
            i = row + j
            if i < start:
                continue
            if i >= stop:
                return
            data, err = image_cell_bytes(d[a["image"]][j])
            oid = _label_text(d[a["id"]][j]) if a["id"] else f"{Path(a['file']).name}#{i}"
            yield RawSample(
                orig_id=oid or f"{Path(a['file']).name}#{i}",
                label=_label_text(d[a["label"]][j]) if a["label"] else None,
                data=data,
                caption=_label_text(d[a["caption"]][j]) if a["caption"] else None,
                error=err,
            )
        row += n
        if row >= stop:
            return


def read_spool(part: PartSpec) -> Iterator[RawSample]:
    t = pq.read_table(part.args["path"])
    for r in t.to_pylist():
        yield RawSample(orig_id=r["orig_id"], label=r["label"], data=r["data"], caption=r["caption"], error=r["error"])
