"""Embeddings on disk in clip-retrieval's layout, one numbered file set per scored part.

``<folder>/img_emb/img_emb_N.npy`` (fp16, L2-normalised, one row per image), the matching
``text_emb/text_emb_N.npy`` for train parts, and ``metadata/metadata_N.parquet`` whose rows line up
with the embedding rows (``image_path`` and ``caption`` as clip-retrieval writes them, plus our ids).
clip-retrieval's ``index`` (autofaiss) and ``back`` read files in name order, so N is zero-padded to
a fixed width: N = source position in the recipe * 100000 + part number.

As in clip-retrieval's own output, no file set has zero rows (autofaiss and ``back`` stumble on empty
arrays): a part with nothing embedded is recorded as ``_empty/N.json`` (its embedding width) instead,
beside the three folders clip-retrieval reads. The metadata carries a ``key`` column (the sample uid).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import layout
from ..store import RunStore, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from ..tables import EMBEDDING_METADATA

N_WIDTH = 8
PARTS_PER_SOURCE = 100_000

METADATA = EMBEDDING_METADATA  # clip-retrieval's metadata_N.parquet (+ our ids)


def part_number(source_index: int, part_index: int) -> str:
    """Zero-padded file number N of a part (stable while the recipe's source order is)."""
    if not 0 <= part_index < PARTS_PER_SOURCE:
        raise ValueError(f"part index {part_index} out of range (max {PARTS_PER_SOURCE - 1})")
    return f"{source_index * PARTS_PER_SOURCE + part_index:0{N_WIDTH}d}"


def folder(store: RunStore, role: str) -> Path:
    return store.path(layout.EMBEDDINGS[role])


def paths(store: RunStore, role: str, n: str) -> dict[str, Path]:
    return {k: store.path(rel) for k, rel in layout.embedding_files(role, n).items()}


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x))
    return buf.getvalue()


def write_part(store: RunStore, role: str, n: str, img: np.ndarray, meta: pa.Table,
               text: Optional[np.ndarray] = None) -> list[str]:
    """Write one part's files atomically (each file; the caller's done marker makes the set atomic).

    ``meta`` has the METADATA columns; ``key`` may be left out (it is the uid). A part with no rows
    writes no embedding files, only its ``_empty`` record, and removes files an earlier run left for it.

    Returns:
        The layout names of the files written.
    """
    if meta.num_rows != img.shape[0] or (text is not None and text.shape[0] != img.shape[0]):
        raise ValueError(f"embedding part {n}: {img.shape[0]} image rows, {meta.num_rows} metadata rows, "
                         f"{None if text is None else text.shape[0]} text rows")
    rel = layout.embedding_files(role, n)
    if "key" not in meta.column_names:
        meta = meta.append_column("key", meta["uid"])
    p = paths(store, role, n)
    if img.shape[0] == 0:
        for k in ("img", "text", "meta"):
            p[k].unlink(missing_ok=True)
        write_json_atomic(p["empty"], {"rows": 0, "dim": int(img.shape[1]) if img.ndim == 2 else 0})
        return [rel["empty"]]
    write_bytes_atomic(p["img"], _npy_bytes(img.astype(np.float16)))
    if text is not None:
        write_bytes_atomic(p["text"], _npy_bytes(text.astype(np.float16)))
    write_parquet_atomic(p["meta"], meta.select(METADATA.names).cast(METADATA))
    p["empty"].unlink(missing_ok=True)
    return [rel["img"], rel["meta"]] + ([rel["text"]] if text is not None else [])


def read_part(store: RunStore, role: str, n: str) -> tuple[np.ndarray, pa.Table]:
    """(fp16 image embeddings, metadata) of one part; raises FileNotFoundError naming the missing file."""
    p = paths(store, role, n)
    if p["empty"].is_file() and not p["img"].exists():
        dim = int(json.loads(p["empty"].read_text(encoding="utf-8")).get("dim") or 0)
        return np.zeros((0, dim), np.float16), METADATA.empty_table()
    for k in ("img", "meta"):
        if not p[k].exists():
            raise FileNotFoundError(f"{p[k]} is missing: re-run the score stage for this part")
    return np.load(p["img"]), pq.read_table(p["meta"])
