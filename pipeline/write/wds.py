"""WebDataset tar + img2dataset-style sidecars (NNNNN.parquet, NNNNN_stats.json)."""

from __future__ import annotations

import json

import pyarrow as pa

from ..store import RunStore, atomic_path, write_json_atomic, write_parquet_atomic
from ..tables import SHARD_META

_META_FIELDS = ["uid", "repeat", "source", "domain", "label", "class_name", "caption_source", "clip_score",
                "width", "height", "sha256", "orig_id", "licence", "synthetic"]


def sample_json(row: dict) -> bytes:
    meta = {k: row.get(k) for k in _META_FIELDS}
    if meta["clip_score"] is not None:
        meta["clip_score"] = round(float(meta["clip_score"]), 6)
    meta["key"] = row["key"]
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def shard_meta(rows: pa.Table) -> pa.Table:
    n = rows.num_rows
    cols = {f.name: rows[f.name] for f in SHARD_META if f.name in rows.column_names}
    cols["status"] = pa.array(["success"] * n)
    cols["error_message"] = pa.nulls(n, pa.string())
    return pa.table({f.name: cols[f.name] for f in SHARD_META}).cast(SHARD_META)


def write_wds_shard(store: RunStore, rows: pa.Table, shard: int) -> None:
    import webdataset as wds

    out = store.path("shards", "wds")
    name = f"{shard:05d}"
    with atomic_path(out / f"{name}.tar") as tmp:
        with open(tmp, "wb") as f:
            # Fixed owner/mode/mtime: the same rows give the same tar bytes.
            with wds.TarWriter(f, user="alive", group="alive", mode=0o644, mtime=0, encoder=False) as sink:
                for r in rows.to_pylist():
                    sink.write({"__key__": r["key"], "jpg": r["image"], "txt": r["caption"].encode("utf-8"),
                                "json": sample_json(r)})
    write_parquet_atomic(out / f"{name}.parquet", shard_meta(rows))
    write_json_atomic(out / f"{name}_stats.json", {
        "count": rows.num_rows, "successes": rows.num_rows, "failed_to_download": 0, "failed_to_resize": 0,
        "status_dict": {"success": rows.num_rows},
    })
