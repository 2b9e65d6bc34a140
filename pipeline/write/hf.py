"""Hugging Face parquet layout: data/train-XXXXX-of-YYYYY.parquet with an Image feature."""

from __future__ import annotations

import json

import pyarrow as pa

from .. import layout
from ..store import RunStore, write_parquet_atomic
from ..tables import HF_ROWS


def hf_features() -> dict:
    """`datasets` feature spec for the rows (stored in the parquet schema metadata and the card)."""
    out = {}
    for f in HF_ROWS:
        if f.name == "image":
            out["image"] = {"_type": "Image"}
        else:
            dtype = {"string": "string", "int32": "int32", "float": "float32", "bool": "bool"}[str(f.type)]
            out[f.name] = {"dtype": dtype, "_type": "Value"}
    return out


def write_hf_shard(store: RunStore, rows: pa.Table, shard: int, n_shards: int) -> None:
    n = rows.num_rows
    image = pa.StructArray.from_arrays(
        [rows["image"].combine_chunks(), pa.array([f"{k}.jpg" for k in rows["key"].to_pylist()], pa.string())],
        fields=list(HF_ROWS.field("image").type),
    )
    from .wds import _column

    cols = {"image": image}
    for f in HF_ROWS:
        if f.name != "image":
            cols[f.name] = _column(rows, f.name, n)
    meta = {b"huggingface": json.dumps({"info": {"features": hf_features()}}).encode()}
    table = pa.table(cols).cast(HF_ROWS).replace_schema_metadata(meta)
    # Statistics (hence a page index with min/max) on the metadata columns, so readers can filter by page;
    # none on the image bytes, where min/max say nothing.
    stats_cols = [f.name for f in HF_ROWS if f.name != "image"]
    write_parquet_atomic(store.path(layout.hf_file(shard, n_shards)), table,
                         row_group_size=1000, write_statistics=stats_cols)
