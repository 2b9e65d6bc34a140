"""WebDataset tar + img2dataset's sidecars (NNNNN.parquet, NNNNN_stats.json) with img2dataset's full column set."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from .. import layout
from ..store import RunStore, atomic_path, write_json_atomic, write_parquet_atomic
from ..tables import SHARD_META

_META_FIELDS = ["uid", "repeat", "source", "domain", "label", "class_name", "caption_source", "clip_score",
                "width", "height", "original_width", "original_height", "sha256", "orig_id", "licence", "synthetic"]
_RENAMED = {"original_width": "orig_width", "original_height": "orig_height"}  # img2dataset name -> ours


def _column(rows: pa.Table, name: str, n: int) -> pa.ChunkedArray | pa.Array:
    src = _RENAMED.get(name, name)
    if src in rows.column_names:
        return rows[src]
    if name == "url":  # URL-list sources keep the URL as their original id; others have no URL
        if "orig_id" in rows.column_names:
            ids = rows["orig_id"]
            return pc.if_else(pc.match_substring_regex(ids, r"^https?://"), ids, pa.scalar(None, pa.string()))
    return pa.nulls(n, SHARD_META.field(name).type)


def sample_json(row: dict) -> bytes:
    meta = {k: row.get(_RENAMED.get(k, k)) for k in _META_FIELDS}
    if meta["clip_score"] is not None:
        meta["clip_score"] = round(float(meta["clip_score"]), 6)
    meta["key"] = row["key"]
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def shard_meta(rows: pa.Table) -> pa.Table:
    """The sidecar parquet of one shard: one row per sample in tar order (only written samples: all success)."""
    n = rows.num_rows
    cols = {f.name: _column(rows, f.name, n) for f in SHARD_META if f.name not in ("status", "error_message")}
    cols["status"] = pa.array(["success"] * n)
    cols["error_message"] = pa.nulls(n, pa.string())
    return pa.table({f.name: cols[f.name] for f in SHARD_META}).cast(SHARD_META)


def shard_stats(n: int) -> dict:
    """img2dataset's ``NNNNN_stats.json`` fields.

    ``start_time``/``end_time``/``duration`` are fixed at 0: the shard files are byte-identical for the same
    recipe + seed, so they cannot hold wall-clock times (the write stage's real timings are in
    ``stats/write/``).
    """
    return {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
            "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": {"success": n} if n else {}}


def write_wds_shard(store: RunStore, rows: pa.Table, shard: int) -> None:
    import webdataset as wds

    out = store.path(layout.WDS)
    name = f"{shard:05d}"
    with atomic_path(out / f"{name}.tar") as tmp:
        with open(tmp, "wb") as f:
            # Fixed owner/mode/mtime: the same rows give the same tar bytes.
            with wds.TarWriter(f, user="alive", group="alive", mode=0o644, mtime=0, encoder=False) as sink:
                for r in rows.to_pylist():
                    sink.write({"__key__": r["key"], "jpg": r["image"], "txt": r["caption"].encode("utf-8"),
                                "json": sample_json(r)})
    write_parquet_atomic(out / f"{name}.parquet", shard_meta(rows))
    write_json_atomic(out / f"{name}_stats.json", shard_stats(rows.num_rows))
