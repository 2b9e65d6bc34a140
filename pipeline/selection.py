"""Selection: the per-sample table every stage after scoring reads (no image bytes).

One row per successfully ingested, paired train sample: its chosen caption, CLIP score, final
keep/drop decision, and the ingest metadata. With scoring enabled it comes from
``score/selection.parquet``; without, every pair is kept with its first candidate caption.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .recipe import Recipe
from .store import RunStore
from .tables import SCORES

META_COLUMNS = ["uid", "source", "domain", "label", "class_name", "width", "height", "orig_width", "orig_height",
                "sha256", "orig_id", "licence", "synthetic"]


def scores_path(store: RunStore) -> Path:
    return store.path("score", "selection.parquet")


def _from_pairs(recipe: Recipe, store: RunStore) -> pa.Table:
    tables = []
    for src in recipe.sources:
        if src.role != "train":
            continue
        for p in store.parts("pair", src.name):
            t = pq.read_table(p)
            first = pc.list_element(t["candidates"], 0)
            n = t.num_rows
            tables.append(pa.table({
                "uid": t["uid"], "caption": first, "caption_source": t["caption_source"],
                "clip_score": pa.nulls(n, pa.float32()), "score_model": pa.nulls(n, pa.string()),
                "keep": pa.array([True] * n), "drop_reason": pa.nulls(n, pa.string()),
            }, schema=SCORES))
    return pa.concat_tables(tables) if tables else SCORES.empty_table()


def metadata(recipe: Recipe, store: RunStore, role: str = "train") -> pa.Table:
    """Ingest metadata (no images) of the successful samples of ``role`` sources."""
    tables = []
    for src in recipe.sources:
        if src.role != role:
            continue
        for p in store.parts("ingest", src.name):
            t = pq.read_table(p, columns=META_COLUMNS + ["status"])
            tables.append(t.filter(pc.equal(t["status"], "success")).drop_columns(["status"]))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in META_COLUMNS})
    return pa.concat_tables(tables)


def load(recipe: Recipe, store: RunStore, kept_only: bool = False) -> pa.Table:
    """Scores/decisions joined with ingest metadata, in a stable order (ingest order)."""
    scores = pq.read_table(scores_path(store)) if recipe.score.enabled else _from_pairs(recipe, store)
    meta = metadata(recipe, store)
    meta = meta.append_column("_order", pa.array(range(meta.num_rows), pa.int64()))
    t = scores.join(meta, "uid", join_type="inner").sort_by("_order").drop_columns(["_order"])
    if kept_only:
        t = t.filter(t["keep"])
    return t
