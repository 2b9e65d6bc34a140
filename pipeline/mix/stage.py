"""Mix stage: selection (kept rows) -> ``mix/manifest.parquet`` + ``mix/mix_report.json``."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import selection
from ..recipe import MixConfig, Recipe, fingerprint
from ..stats import StageStats
from ..store import RunStore, write_json_atomic, write_parquet_atomic
from ..tables import EXCLUDED
from .mixer import REASONS, MixInfeasibleError, MixResult, manifest_from, mix
from .report import build_report, summary_lines, table_rows

log = logging.getLogger(__name__)
STAGE = "mix"
UNIT = "all"
CODE_VERSION = "mix-v1"  # bump when the manifest changes for the same input and config
INPUT_COLUMNS = ["uid", "domain", "source", "class_name"]


def mix_table(table: pa.Table, cfg: MixConfig, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """Mix a pool of samples to the targets of ``cfg``.

    Pure and vectorised; the same table, config and seed give the same manifest, byte for byte.

    Args:
        table: At least ``uid``, ``domain``, ``source``, ``class_name`` (null for unlabeled rows,
            e.g. captioned general data: each such row is a class of its own).
        cfg: Targets, class balancing, caps and repeats.
        seed: Seed of the draws inside each class.

    Returns:
        (manifest with tables.MANIFEST schema, rows in input order; the report dict). Targets the
        pool cannot meet are listed in ``report["unmet"]`` and handled as ``cfg.on_infeasible``
        says.

    Raises:
        ValueError: a required column is missing or has nulls.
        MixInfeasibleError: targets cannot be met and ``on_infeasible`` is ``error``.
    """
    result = mix(table, cfg, seed)
    return manifest_from(table, result), build_report(result, cfg, seed)


def excluded_from(table: pa.Table, result: MixResult, outcome: np.ndarray) -> pa.Table:
    """Rows of the pool left out of the mix, with why (tables.EXCLUDED); ``outcome`` = result.outcome()."""
    idx = np.flatnonzero(outcome > 0)
    codes = outcome[idx]
    reasons = pa.array([REASONS[c] for c in sorted(REASONS)], pa.string())
    lookup = np.zeros(max(REASONS) + 1, np.int32)
    lookup[sorted(REASONS)] = np.arange(len(REASONS), dtype=np.int32)
    names = pa.array(result.pool.bucket_names, pa.string())
    ind = pa.array(idx)
    return pa.Table.from_arrays(
        [table["uid"].take(ind).cast(pa.string()), table["source"].take(ind).cast(pa.string()),
         pa.array(np.full(len(idx), STAGE, dtype=object), pa.string()),
         reasons.take(pa.array(lookup[codes])), names.take(pa.array(result.pool.row_bucket[idx]))],
        schema=EXCLUDED,
    )


def table_digest(table: pa.Table) -> str:
    """sha256 of a table's columns (their Arrow buffers), for the stage fingerprint."""
    h = hashlib.sha256()
    for name in table.column_names:
        for chunk in table[name].chunks:  # the same input files give the same chunks
            h.update(f"{name}:{chunk.type}:{len(chunk)}:{chunk.offset}".encode())
            parts = [chunk, chunk.dictionary] if pa.types.is_dictionary(chunk.type) else [chunk]
            for arr in parts:
                for buf in arr.buffers():
                    if buf is not None:
                        h.update(memoryview(buf))
    return h.hexdigest()[:16]


def manifest_path(store: RunStore) -> Path:
    return store.path(STAGE, "manifest.parquet")


def report_path(store: RunStore) -> Path:
    return store.path(STAGE, "mix_report.json")


def run(recipe: Recipe, store: RunStore) -> StageStats:
    """Mix the kept samples of a run to ``recipe.mix``; skipped when input and config are unchanged.

    Writes ``mix/manifest.parquet``, ``mix/mix_report.json`` and ``excluded/mix/excluded.parquet``
    (every pool row left out, with its reason), all atomically. With ``on_infeasible: error`` the
    report is written before the error is raised, so the reasons can be read.

    Returns:
        StageStats: total = pool rows, kept = distinct samples in the mix, dropped by reason,
        counters rows_out (repeats counted), repeated_samples, buckets, unmet_targets, feasible,
        max_share_error_ppm (of a percentage point).
    """
    cfg = recipe.mix
    stats = StageStats(STAGE)
    if not cfg.enabled:
        log.info("mix: disabled in the recipe; the writer takes every kept sample once")
        return stats
    with stats.timer():
        pool = selection.load(recipe, store, kept_only=True).select(INPUT_COLUMNS)
        fp = fingerprint(CODE_VERSION, cfg, recipe.seed, table_digest(pool))
        if store.is_done(STAGE, UNIT, fp) and manifest_path(store).exists() and report_path(store).exists():
            log.info("mix: inputs and config unchanged; skipping")
            return store.read_unit_stats(STAGE, UNIT)
        try:
            result = mix(pool, cfg, recipe.seed)
        except MixInfeasibleError as e:
            write_json_atomic(report_path(store), e.report)
            raise
        report = build_report(result, cfg, recipe.seed)
        manifest = manifest_from(pool, result)
        outcome = result.outcome()
        write_parquet_atomic(manifest_path(store), manifest)
        write_parquet_atomic(store.path("excluded", STAGE, "excluded.parquet"), excluded_from(pool, result, outcome))
        write_json_atomic(report_path(store), report)
    stats.total = pool.num_rows
    stats.kept = report["unique_samples"]
    outcome_counts = np.bincount(outcome, minlength=max(REASONS) + 1)
    for code, reason in REASONS.items():
        if outcome_counts[code]:
            stats.drop(reason, int(outcome_counts[code]))
    stats.add("rows_out", report["total"])
    stats.add("repeated_samples", int((result.repeats > 1).sum()))
    stats.add("buckets", sum(1 for b in report["buckets"] if b["rows"]))
    stats.add("unmet_targets", len(report["unmet"]))
    stats.add("feasible", int(report["feasible"]))
    stats.add("max_share_error_ppm", round(report["max_share_error_pt"] * 1e4))
    for line in summary_lines(report):
        (log.warning if report["unmet"] else log.info)("%s", line)
    store.write_unit_stats(stats, UNIT)
    store.mark_done(STAGE, UNIT, fp, rows=manifest.num_rows, total=report["total"])
    return stats


def load_report(store: RunStore) -> dict[str, Any]:
    """The report of a finished mix stage."""
    return json.loads(report_path(store).read_text())


def report_table(store: RunStore) -> list[dict[str, Any]]:
    """Per-bucket target vs realised rows of a finished run (CLI table / Prefect table artifact)."""
    return table_rows(load_report(store))

