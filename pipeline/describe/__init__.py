"""Describe: class-level descriptive sentences (CuPL-style) -> ``describe/descriptions.parquet``.

Backends share one interface (:class:`~pipeline.describe.base.Backend`): given the classes, return
rows of the DESCRIPTIONS table. The ``template`` backend is the hand-written CLIP baseline.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import layout
from ..executor import Stage, Unit, UnitContext
from ..recipe import DescribeConfig, Recipe
from ..stats import StageStats
from ..store import RunStore
from ..tables import DESCRIPTIONS
from .classes import ClassInfo

log = logging.getLogger(__name__)
STAGE = "describe"
UNIT = "all"
__all__ = ["STAGE", "ClassInfo", "DescribeStage", "collect_classes", "describe_classes", "failed_classes",
           "load_kept", "make_backend", "summary_lines"]


def _ingest_files(recipe: Recipe, store: RunStore) -> list[str]:
    from ..ingest import ingested_parts

    return [layout.ingest_part(s, i) for s, i in ingested_parts(store, recipe)]


def collect_classes(recipe: Recipe, store: RunStore) -> list[ClassInfo]:
    """Distinct (domain, class_name, context) over all ingested labeled samples, sorted."""
    from ..ingest import ingested_parts

    found: set[ClassInfo] = set()
    for source, i in ingested_parts(store, recipe):
        src = recipe.source(source)
        t = pq.read_table(store.path(layout.ingest_part(source, i)), columns=["class_name", "status"])
        t = t.filter(pc.and_(pc.equal(t["status"], "success"), pc.is_valid(t["class_name"])))
        for name in pc.unique(t["class_name"]).to_pylist():
            found.add(ClassInfo(src.domain, name, src.context))
    return sorted(found, key=lambda c: (c.domain, c.class_name, c.context or ""))


def make_backend(cfg: DescribeConfig, store: RunStore):
    """The backend ``cfg.backend`` names (template, openai, transformers)."""
    from .template import TemplateBackend

    backends = {"template": TemplateBackend}
    try:
        from .llm import LLM_BACKENDS  # openai / transformers backends

        backends.update(LLM_BACKENDS)
    except ImportError:
        pass
    if cfg.backend not in backends:
        raise ValueError(f"describe.backend {cfg.backend!r} is not available (have {sorted(backends)})")
    return backends[cfg.backend](cfg, store)


def describe_classes(cfg: DescribeConfig, store: RunStore, classes: list[ClassInfo], stats: StageStats) -> pa.Table:
    """Describe ``classes`` with the backend ``cfg`` names; the DESCRIPTIONS table, sorted, with ``stats`` filled.

    A class whose requests kept failing is in the table with ``reject_reason=request_failed: ...``.

    Raises:
        RuntimeError: every class failed and nothing was kept (nothing is worth writing).
    """
    backend = make_backend(cfg, store)
    table = backend.describe(classes, stats)
    table = table.cast(DESCRIPTIONS).sort_by([("domain", "ascending"), ("class_name", "ascending"),
                                               ("question_id", "ascending"), ("sample_index", "ascending")])
    stats.total += table.num_rows
    stats.kept += int(pc.sum(table["kept"]).as_py() or 0)
    for reason, (n, example) in _reason_counts(table).items():
        stats.drop(reason, n, example=example)
    failed = failed_classes(table)
    stats.counters["failed_classes"] = len(failed)
    if classes and len(failed) == len(classes) and stats.kept == 0:
        reasons = sorted({r for rs in failed.values() for r in rs})
        raise RuntimeError(f"describe: every class failed ({len(classes)}); nothing written. Reasons: {reasons[:3]}")
    if failed:
        names = ", ".join(f"{d}/{c}" for d, c in sorted(failed)[:20]) + (" ..." if len(failed) > 20 else "")
        example = next(iter(sorted(failed.items())))[1][0]
        log.error("describe: %d of %d classes FAILED (some of their requests kept failing, e.g. %r): %s. "
                  "Their missing samples are recorded as request_failed; the other classes are complete. "
                  "Re-run the stage to retry only what is missing.", len(failed), len(classes), example, names)
    return table


# Client-side knobs that do not change what is generated (requests are cached by content), and
# captions_per_image, which is the pair stage's.
RUN_ONLY = {"concurrency", "timeout", "max_retries", "backoff_base", "backoff_max", "api_key_env", "device",
            "batch_size", "captions_per_image"}


class DescribeStage(Stage):
    """One unit over every ingested class (the LLM client inside is concurrent and caches each request).

    Its inputs are the ingest parts (the classes come from them); its config the describe block, the
    backend's version (model, prompt shas, post-processing) and the class list. A run where some
    classes failed writes what it has and stays incomplete: the next run asks again for exactly
    the missing samples, and pair reruns whenever the set of described classes changes.
    """

    name = STAGE

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        classes = collect_classes(recipe, store)
        version = make_backend(recipe.describe, store).version()
        return [Unit(UNIT, payload=classes, inputs=tuple(_ingest_files(recipe, store)),
                     config={"describe": [recipe.describe.model_dump(mode="json", exclude=RUN_ONLY), version,
                                          [c.__dict__ for c in classes]]})]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        classes: list[ClassInfo] = unit.payload
        table = describe_classes(ctx.recipe.describe, ctx.store, classes, ctx.stats)
        ctx.write_parquet(layout.DESCRIPTIONS, table)
        failed = failed_classes(table)
        ctx.info["classes"] = len(classes)
        ctx.info["failed_classes"] = sorted(f"{d}/{c}" for d, c in failed)
        if failed:
            ctx.mark_incomplete(f"{len(failed)} of {len(classes)} classes failed")


FAILED_PREFIXES = ("request_failed", "generation_failed")


def failed_classes(table: pa.Table) -> dict[tuple[str, str], list[str]]:
    """(domain, class_name) -> distinct failure reasons, for classes with failed requests."""
    out: dict[tuple[str, str], list[str]] = {}
    for d, c, r in zip(table["domain"].to_pylist(), table["class_name"].to_pylist(),
                       table["reject_reason"].to_pylist()):
        if r and r.startswith(FAILED_PREFIXES):
            rs = out.setdefault((d, c), [])
            if r not in rs:
                rs.append(r)
    return out


def _reason_counts(table: pa.Table) -> dict[str, tuple[int, str]]:
    """Stats key (the reason before any ':' detail) -> (count, first full reason)."""
    rej = table.filter(pc.invert(table["kept"]))
    out: dict[str, tuple[int, str]] = {}
    for r in rej["reject_reason"].to_pylist():
        full = r or "unknown"
        key = full.split(":", 1)[0].strip() or "unknown"
        n, ex = out.get(key, (0, full))
        out[key] = (n + 1, ex)
    return out


def summary_lines(stats: StageStats) -> list[str]:
    """Human-readable stage summary: requests, tokens, throughput, cache, failures, kept/rejected."""
    c = {**stats.counters, **stats.gauges}
    lines = [
        f"classes {int(c.get('classes', 0))}, samples {int(c.get('samples', 0))}, "
        f"cache hits {int(c.get('cache_hits', 0))} ({100 * float(c.get('cache_hit_rate', 0)):.1f}%)",
        f"requests {int(c.get('requests', 0))} (ok {int(c.get('requests_ok', 0))}, retries "
        f"{int(c.get('retries', 0))}, failed {int(c.get('failed_requests', 0))})",
        f"tokens in {int(c.get('tokens_in', 0))}, out {int(c.get('tokens_out', 0))}, "
        f"{float(c.get('tokens_per_s', 0)):.1f} tokens/s over {float(c.get('generation_seconds', 0)):.1f}s",
        f"sentences kept {stats.kept} of {stats.total}; rejected: "
        + (", ".join(f"{k} {v}" for k, v in sorted(stats.dropped.items())) or "none"),
    ]
    if c.get("failed_classes"):
        lines.append(f"FAILED classes: {int(c['failed_classes'])} (re-run to retry them)")
    return lines


def load_kept(store: RunStore) -> dict[tuple[str, str], list[str]]:
    """(domain, class_name) -> kept sentences in table order (read once per file version; do not mutate)."""
    p = store.path(layout.DESCRIPTIONS)
    st = p.stat()
    return _load_kept(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _load_kept(path: str, mtime_ns: int, size: int) -> dict[tuple[str, str], list[str]]:
    t = pq.read_table(path, columns=["domain", "class_name", "text", "kept"])
    t = t.filter(t["kept"])
    out: dict[tuple[str, str], list[str]] = {}
    for d, c, x in zip(t["domain"].to_pylist(), t["class_name"].to_pylist(), t["text"].to_pylist()):
        out.setdefault((d, c), []).append(x)
    return out
