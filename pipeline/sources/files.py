"""Local files: image folders (folder = class), parquet tables, and spooled parts."""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ..recipe import ImageFolderSource, ParquetSource, fingerprint
from .base import PartSpec, RawSample, SourceError
from .select import (Entry, check_label_names, chunk, excluded_args, has_label_filter, require_rows,
                     select)


def plan_imagefolder(src: ImageFolderSource, part_size: int, spool_dir: Path, seed: int = 0) -> list[PartSpec]:
    root = Path(src.path)
    entries = [Entry((rel, size, mtime), rel, label) for rel, label, size, mtime in list_imagefolder(src)]
    check_label_names(src, {e.label for e in entries})
    kept, excluded = select(entries, src, seed)
    require_rows(src, kept, excluded, f"the image folder {root}")
    base = fingerprint(src, "imagefolder-v2")
    parts = []
    for i, (chunk_kept, chunk_excl) in enumerate(chunk(entries, kept, excluded, part_size)):
        ex = excluded_args(chunk_excl)
        parts.append(PartSpec(src.name, i, "files",
                              {"root": str(root), "entries": [(e.ref[0], e.label) for e in chunk_kept], "excluded": ex},
                              fingerprint(base, i, [(e.ref, e.label) for e in chunk_kept], ex), len(chunk_kept)))
    return parts


def list_imagefolder(src: ImageFolderSource) -> list[tuple[str, str, int, int]]:
    """(relative path, label = class folder, size, mtime) of every file under the class folders, sorted."""
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
    return entries


def read_files(part: PartSpec) -> Iterator[RawSample]:
    """Files of a part: paths relative to ``root``, or (root empty) local paths / fsspec URLs of a Hub folder."""
    root = part.args["root"]
    ids = part.args.get("ids")
    for i, (rel, label) in enumerate(part.args["entries"]):
        p = str(Path(root) / rel) if root else rel
        oid = ids[i] if ids else rel
        try:
            with open_binary(p) as fh:
                data = fh.read()
            yield RawSample(orig_id=oid, label=label, data=data)
        except OSError as e:
            yield RawSample(orig_id=oid, label=label, error=f"cannot read {p}: {e}")


def _parquet_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
    elif any(c in path for c in "*?["):
        files = sorted(globlib.glob(path, recursive=True))
    else:
        files = [path] if p.exists() else []
    return files


def open_binary(path: str):
    """A local path or any fsspec URL (hf://datasets/..., s3://...) opened for reading."""
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def parquet_file(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(open_binary(path)) if "://" in path else pq.ParquetFile(path)


def class_label_names(schema: pa.Schema, column: Optional[str]) -> Optional[list[str]]:
    """ClassLabel names of ``column`` from the Hugging Face features stored in a parquet schema, if any."""
    if not column or not schema.metadata or b"huggingface" not in schema.metadata:
        return None
    try:
        from datasets import ClassLabel, Features

        feat = Features.from_arrow_schema(schema).get(column)
    except Exception:  # foreign or broken metadata: the column's own values are the labels
        return None
    return list(feat.names) if isinstance(feat, ClassLabel) else None


@dataclass
class ParquetColumns:
    image: str
    label: Optional[str] = None
    caption: Optional[str] = None
    id: Optional[str] = None
    names: Optional[list[str]] = None  # ClassLabel names: label cells are ints into this list
    fixed_label: Optional[str] = None


def _file_version(path: str) -> Any:
    if "://" in path:
        return path  # resolved Hub data files carry the commit in their URL
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def plan_parquet_files(src: Any, files: list[str], cols: ParquetColumns, part_size: int, seed: int,
                       fp_base: str, id_prefix: Optional[str] = None) -> list[PartSpec]:
    """Parts of row subsets of parquet files (local or fsspec URLs), read inside the ingest units.

    Only footers are read, plus the label (and id) column where the label filters, ``sample`` or
    ``class_names`` need the rows' labels; images are read by the units.
    """
    need_labels = bool(cols.label) and (has_label_filter(src) or src.class_names or
                                        (src.max_samples and src.sample == "stratified"))
    per_file: list[tuple[str, list[Entry]]] = []
    entries: list[Entry] = []
    offset = 0
    for f in files:
        try:
            pf = parquet_file(f)
        except (OSError, pa.ArrowInvalid) as e:
            raise SourceError(f"source {src.name!r}: {f} is not a readable parquet file: {e}") from None
        names = pf.schema_arrow.names
        need = [c for c in (cols.image, cols.label, cols.caption, cols.id) if c]
        missing = [c for c in need if c not in names]
        if missing:
            raise SourceError(
                f"source {src.name!r}: {f} has no column(s) {missing}; its columns are {names}. "
                "Set image_column/label_column/caption_column in the recipe."
            )
        n = pf.metadata.num_rows
        labels: list[Optional[str]] = [cols.fixed_label] * n
        if need_labels:
            labels = _labels(pf.read(columns=[cols.label]).column(0).to_pylist(), cols.names)
        ids = (pf.read(columns=[cols.id]).column(0).to_pylist() if cols.id else None)
        name = Path(f).name
        fe = [Entry((f, i), (_label_text(ids[i]) if ids and ids[i] is not None else
                             f"{id_prefix}/{offset + i}" if id_prefix else f"{name}#{i}"), labels[i])
              for i in range(n)]
        offset += n
        per_file.append((f, fe))
        entries += fe
    if need_labels:
        check_label_names(src, {e.label for e in entries if e.label is not None})
    kept, excluded = select(entries, src, seed)
    require_rows(src, kept, excluded, f"{src.id if hasattr(src, 'id') else src.path}")
    kept_ids = {id(e) for e in kept}
    excl_by_id = {id(x.entry): x for x in excluded}
    parts: list[PartSpec] = []
    pending: list[list[Optional[str]]] = []
    for f, fe in per_file:
        k = [e for e in fe if id(e) in kept_ids]
        x = [excl_by_id[id(e)] for e in fe if id(e) in excl_by_id]
        if not k:  # a fully excluded file: its rows are recorded with a neighbouring part
            if parts:
                parts[-1].args["excluded"] += excluded_args(x)
            else:
                pending += excluded_args(x)
            continue
        for ck, cx in chunk(fe, k, x, part_size):
            rows = [e.ref[1] for e in ck]
            ex, pending = pending + excluded_args(cx), []
            parts.append(PartSpec(
                src.name, len(parts), "parquet_rows",
                {"file": f, "rows": rows, "ids": [e.orig_id for e in ck], "labels": [e.label for e in ck]
                 if need_labels or cols.fixed_label else None, "image": cols.image, "label": cols.label,
                 "caption": cols.caption, "names": cols.names, "fixed_label": cols.fixed_label, "excluded": ex},
                "", len(rows)))
    for p in parts:  # fingerprints after the merges above, so they cover exactly what a part holds
        a = p.args
        p.fingerprint = fingerprint(fp_base, p.part, a["file"], _file_version(a["file"]), a["rows"], a["ids"],
                                    a["labels"], a["excluded"])
    return parts


def _labels(values: list, names: Optional[list[str]]) -> list[Optional[str]]:
    if names is None:
        return [_label_text(v) for v in values]
    return [names[int(v)] if v is not None and 0 <= int(v) < len(names) else None for v in values]


def plan_parquet(src: ParquetSource, part_size: int, spool_dir: Path, seed: int = 0) -> list[PartSpec]:
    files = _parquet_files(src.path)
    if not files:
        raise SourceError(f"source {src.name!r}: no parquet files at {src.path} (fix 'path' in the recipe)")
    try:
        schema = pq.read_schema(files[0])
    except (OSError, pa.ArrowInvalid) as e:
        raise SourceError(f"source {src.name!r}: {files[0]} is not a readable parquet file: {e}") from None
    cols = ParquetColumns(src.image_column, src.label_column, src.caption_column, src.id_column,
                          class_label_names(schema, src.label_column))
    try:
        return plan_parquet_files(src, files, cols, part_size, seed, fingerprint(src, "parquet-v2"))
    except SourceError as e:
        if "leaves no rows" in str(e) and "label filters" not in str(e):
            shown = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
            raise SourceError(f"source {src.name!r}: the parquet file(s) at {src.path} hold no rows ({shown}); "
                              "fix 'path' or remove the source") from None
        raise


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
    """The part's rows of one parquet file, reading only the row groups that hold them."""
    a = part.args
    cols = list(dict.fromkeys(c for c in (a["image"], a["label"], a["caption"]) if c))
    pf = parquet_file(a["file"])
    wanted = a["rows"]
    starts = [0]
    for g in range(pf.metadata.num_row_groups):
        starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
    k = 0
    for g in range(pf.metadata.num_row_groups):
        lo, hi = starts[g], starts[g + 1]
        local = []
        while k < len(wanted) and wanted[k] < hi:
            local.append((k, wanted[k] - lo))
            k += 1
        if not local:
            continue
        t = pf.read_row_group(g, columns=cols).take([j for _, j in local])
        d = t.to_pydict()
        for r, (idx, _) in enumerate(local):
            data, err = image_cell_bytes(d[a["image"]][r])
            if a.get("labels") is not None:
                label = a["labels"][idx]
            elif a["label"]:
                label = _labels([d[a["label"]][r]], a.get("names"))[0]
            else:
                label = a.get("fixed_label")
            yield RawSample(orig_id=a["ids"][idx], label=label, data=data,
                            caption=_label_text(d[a["caption"]][r]) if a["caption"] else None, error=err)


def read_spool(part: PartSpec) -> Iterator[RawSample]:
    t = pq.read_table(part.args["path"])
    for r in t.to_pylist():
        yield RawSample(orig_id=r["orig_id"], label=r["label"], data=r["data"], caption=r["caption"], error=r["error"])
