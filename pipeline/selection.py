"""Selection: the per-sample table every stage after scoring reads (no image bytes).

One row per successfully ingested, paired train sample: its chosen caption, CLIP score, final
keep/drop decision, and the ingest metadata. With scoring enabled it comes from
``score/selection.parquet``; without, every pair is kept with its first candidate caption.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout
from .recipe import Recipe
from .store import RunStore
from .tables import SCORES

META_COLUMNS = ["uid", "source", "domain", "label", "class_name", "width", "height", "orig_width", "orig_height",
                "sha256", "orig_id", "licence", "synthetic"]


def _parts(recipe: Recipe, store: RunStore, role: str = "train") -> list[tuple[str, int]]:
    from .ingest import ingested_parts

    return ingested_parts(store, recipe, role=role)


def input_files(recipe: Recipe, store: RunStore) -> list[str]:
    """Every run-store file :func:`load` reads (layout names), for the fingerprints of its readers."""
    parts = _parts(recipe, store)
    files = [layout.SELECTION] if recipe.score.enabled else [layout.pair_part(s, i) for s, i in parts]
    return files + [layout.ingest_part(s, i) for s, i in parts]


def _from_pairs(recipe: Recipe, store: RunStore) -> pa.Table:
    tables = []
    for s, i in _parts(recipe, store):
        t = pq.read_table(store.path(layout.pair_part(s, i)))
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
    for s, i in _parts(recipe, store, role):
        t = pq.read_table(store.path(layout.ingest_part(s, i)), columns=META_COLUMNS + ["status"])
        tables.append(t.filter(pc.equal(t["status"], "success")).drop_columns(["status"]))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in META_COLUMNS})
    return pa.concat_tables(tables)


def load(recipe: Recipe, store: RunStore, kept_only: bool = False) -> pa.Table:
    """Scores/decisions joined with ingest metadata, in a stable order (ingest order)."""
    scores = pq.read_table(store.path(layout.SELECTION)) if recipe.score.enabled else _from_pairs(recipe, store)
    meta = metadata(recipe, store)
    meta = meta.append_column("_order", pa.array(range(meta.num_rows), pa.int64()))
    t = scores.join(meta, "uid", join_type="inner").sort_by("_order").drop_columns(["_order"])
    if kept_only:
        t = t.filter(t["keep"])
    return t
