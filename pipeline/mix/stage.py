"""Mix stage: selection (kept rows) -> ``mix/manifest.parquet`` + ``mix/mix_report.json``."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from .. import layout, selection
from ..executor import Stage, Unit, UnitContext
from ..recipe import MixConfig, Recipe
from ..store import RunStore
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
    result = _mix(table, cfg, seed)
    return manifest_from(table, result), build_report(result, cfg, seed)


def _mix(table: pa.Table, cfg: MixConfig, seed: int) -> MixResult:
    """:func:`mix`, with the report of what is possible attached to an infeasible-target error."""
    try:
        return mix(table, cfg, seed)
    except MixInfeasibleError as e:
        e.report = build_report(e.result, cfg, seed)
        raise


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


class MixStage(Stage):
    """One unit over the whole kept pool: the selection (with ingest metadata) -> manifest + report."""

    name = STAGE

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.mix.enabled

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        return [Unit(UNIT, config={"mix": [CODE_VERSION, recipe.mix, recipe.seed]},
                     inputs=tuple(selection.input_files(recipe, store)))]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        """Writes the manifest, the report and every pool row left out (with its reason).

        With ``on_infeasible: error`` the report is written before the error is raised, so the
        reasons can be read; the unit then has no marker and reruns.
        """
        recipe, cfg, stats = ctx.recipe, ctx.recipe.mix, ctx.stats
        pool = selection.load(recipe, ctx.store, kept_only=True).select(INPUT_COLUMNS)
        try:
            result = _mix(pool, cfg, recipe.seed)
        except MixInfeasibleError as e:
            ctx.write_json(layout.MIX_REPORT, e.report)
            raise
        report = build_report(result, cfg, recipe.seed)
        manifest = manifest_from(pool, result)
        outcome = result.outcome()
        ctx.write_parquet(layout.MANIFEST, manifest)
        ctx.exclude(excluded_from(pool, result, outcome))
        ctx.write_json(layout.MIX_REPORT, report)
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
        stats.gauge("feasible", int(report["feasible"]))
        stats.gauge("max_share_error_ppm", round(report["max_share_error_pt"] * 1e4))
        for line in summary_lines(report):
            (log.warning if report["unmet"] else log.info)("%s", line)
        ctx.info.update(rows=manifest.num_rows, total=report["total"])


def load_report(store: RunStore) -> dict[str, Any]:
    """The report of a finished mix stage."""
    return json.loads(store.path(layout.MIX_REPORT).read_text())


def report_table(store: RunStore) -> list[dict[str, Any]]:
    """Per-bucket target vs realised rows of a finished run (CLI table / Prefect table artifact)."""
    return table_rows(load_report(store))
