"""Describe: class-level descriptive sentences (CuPL-style) -> ``describe/descriptions.parquet``.

Backends share one interface (:class:`~pipeline.describe.base.Backend`): given the classes, return
rows of the DESCRIPTIONS table. The ``template`` backend is the hand-written CLIP baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..recipe import Recipe, fingerprint
from ..stats import StageStats
from ..store import RunStore, write_parquet_atomic
from ..tables import DESCRIPTIONS

log = logging.getLogger(__name__)
STAGE = "describe"


@dataclass(frozen=True, order=True)
class ClassInfo:
    domain: str
    class_name: str
    context: Optional[str] = None


def collect_classes(recipe: Recipe, store: RunStore) -> list[ClassInfo]:
    """Distinct (domain, class_name, context) over all ingested labeled samples, sorted."""
    from ..ingest import ingested_parts

    found: set[ClassInfo] = set()
    for source, path in ingested_parts(store, recipe):
        src = recipe.source(source)
        t = pq.read_table(path, columns=["class_name", "status"])
        t = t.filter(pc.and_(pc.equal(t["status"], "success"), pc.is_valid(t["class_name"])))
        for name in pc.unique(t["class_name"]).to_pylist():
            found.add(ClassInfo(src.domain, name, src.context))
    return sorted(found, key=lambda c: (c.domain, c.class_name, c.context or ""))


def descriptions_path(store: RunStore):
    return store.path(STAGE, "descriptions.parquet")


def run(recipe: Recipe, store: RunStore, classes: list[ClassInfo]) -> StageStats:
    """Describe every class with the recipe's backend; skipped when inputs + config are unchanged."""
    from .template import TemplateBackend

    cfg = recipe.describe
    backends = {"template": TemplateBackend}
    try:
        from .llm import LLM_BACKENDS  # openai / transformers backends

        backends.update(LLM_BACKENDS)
    except ImportError:
        pass
    if cfg.backend not in backends:
        raise ValueError(f"describe.backend {cfg.backend!r} is not available (have {sorted(backends)})")
    backend = backends[cfg.backend](cfg, store)
    fp = fingerprint(cfg, backend.version(), [c.__dict__ for c in classes])
    out = descriptions_path(store)
    if store.is_done(STAGE, "all", fp) and out.exists():
        return store.read_stats(STAGE)
    stats = StageStats(STAGE)
    with stats.timer():
        table = backend.describe(classes, stats)
    table = table.cast(DESCRIPTIONS).sort_by([("domain", "ascending"), ("class_name", "ascending"),
                                               ("question_id", "ascending"), ("sample_index", "ascending")])
    stats.total += table.num_rows
    stats.kept += int(pc.sum(table["kept"]).as_py() or 0)
    for reason, n in _reason_counts(table).items():
        stats.drop(reason, n)
    write_parquet_atomic(out, table)
    store.clear_stats(STAGE)
    store.write_stats(stats, "all")
    store.mark_done(STAGE, "all", fp, rows=table.num_rows)
    return stats


def _reason_counts(table: pa.Table) -> dict[str, int]:
    rej = table.filter(pc.invert(table["kept"]))
    out: dict[str, int] = {}
    for r in rej["reject_reason"].to_pylist():
        out[r or "unknown"] = out.get(r or "unknown", 0) + 1
    return out


def load_kept(store: RunStore) -> dict[tuple[str, str], list[str]]:
    """(domain, class_name) -> kept sentences in table order."""
    t = pq.read_table(descriptions_path(store), columns=["domain", "class_name", "text", "kept"])
    t = t.filter(t["kept"])
    out: dict[tuple[str, str], list[str]] = {}
    for d, c, x in zip(t["domain"].to_pylist(), t["class_name"].to_pylist(), t["text"].to_pylist()):
        out.setdefault((d, c), []).append(x)
    return out
