"""The `build-alive` Prefect flow: the pipeline's stages, each unit a task (units are shards, never samples).

No data logic and no resume logic live here: the flow drives :func:`pipeline.executor.drive` over
:data:`pipeline.stages.STAGES` with a mapper that submits each pending unit as a Prefect task (on
the local runner or on Ray), so a re-run (or a retry) only redoes what is missing or changed.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from tqdm.auto import tqdm

from pipeline import describe, layout
from pipeline.executor import Executor, PlannedUnit, Stage, StagePlan, drive, is_transient
from pipeline.provenance import models_used
from pipeline.recipe import Recipe, load_recipe
from pipeline.runner import stage_resources, task_runner_scope
from pipeline.sources.inspect import preflight
from pipeline.stats import StageStats
from pipeline.store import RunStore, write_text_atomic

_POOL: Optional[ProcessPoolExecutor] = None
_POOL_SIZE = 0


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only for errors a retry can fix (see pipeline.executor.is_transient)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is not worth a retry
        return False
    return isinstance(exc, BaseException) and is_transient(exc)


TRANSIENT = dict(retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE, retry_condition_fn=_transient)


def _pool(n: int) -> ProcessPoolExecutor:
    """One process pool per flow process: Pillow decode/resize is CPU-bound Python-side work."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != n:
        import multiprocessing as mp

        _POOL = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))
        _POOL_SIZE = n
    return _POOL


def _run_unit(recipe: Recipe, out: str, stage: str, planned: PlannedUnit) -> StageStats:
    return Executor(recipe, RunStore(out)).run_unit(stage, planned)


def _run_prepared(recipe: Recipe, out: str, stage: str, item: Any) -> Any:
    ex = Executor(recipe, RunStore(out))
    return ex.stage(stage).run_prepared(recipe, ex.store, item)


# ----------------------------- tasks: one generic unit task, named per stage -----------------------------
@task(name="unit", **TRANSIENT)
def unit_task(recipe: Recipe, out: str, stage: str, planned: PlannedUnit, cpu_bound: bool) -> StageStats:
    # Local runs decode in a process pool; on Ray every task already runs in its own worker process.
    if cpu_bound and recipe.runner.kind == "local":
        return _pool(recipe.ingest.processes).submit(_run_unit, recipe, out, stage, planned).result()
    return _run_unit(recipe, out, stage, planned)


@task(name="prepare", **TRANSIENT)
def prepare_task(recipe: Recipe, out: str, stage: str, item: Any) -> Any:
    return _run_prepared(recipe, out, stage, item)


def prefect_mapper(recipe: Recipe, out: str, progress: bool):
    """Map a stage's units (or its scratch items) over Prefect tasks, with progress.

    On Ray every task asks for what its stage says it uses (CPUs, a GPU for CUDA scoring), so the
    scheduler packs tasks onto nodes without oversubscribing them.
    """
    def run(stage: Stage, kind: str, items: list[Any]) -> list[Any]:
        if not items:
            return []
        with stage_resources(recipe, stage if kind == "unit" else None):
            return _submit(stage, kind, items)

    def _submit(stage: Stage, kind: str, items: list[Any]) -> list[Any]:
        if kind == "prepare":
            t = prepare_task.with_options(name=f"{stage.name}-prepare")
            futures = [t.submit(recipe, out, stage.name, it) for it in items]
        else:
            t = unit_task.with_options(name=f"{stage.name}-unit")
            futures = [t.with_options(task_run_name=f"{stage.name}:{pu.name}").submit(
                recipe, out, stage.name, pu, stage.cpu_bound) for pu in items]
        return _gather(futures, f"{stage.name}" if kind == "unit" else f"{stage.name} ({kind})", progress)

    return run


# ----------------------------- helpers -----------------------------
def _in_flow() -> bool:
    return FlowRunContext.get() is not None


def _gather(futures: list, desc: str, show: bool) -> list:
    """Wait for mapped tasks with a progress bar (CLI) and a progress artifact (Prefect UI)."""
    n = len(futures)
    if n == 0:
        return []
    art = None
    try:
        art = create_progress_artifact(progress=0.0, description=f"{desc}: 0/{n}")
    except Exception:  # artifacts need an API; progress is best effort
        art = None
    done = 0
    with tqdm(total=n, desc=desc, unit="shard", disable=not show, file=sys.stderr, leave=False) as bar:
        for _ in as_completed(futures):
            done += 1
            bar.update(1)
            if art is not None and (done == n or done % max(1, n // 20) == 0):
                try:
                    update_progress_artifact(art, progress=100.0 * done / n, description=f"{desc}: {done}/{n}")
                except Exception:
                    pass
    return [f.result() for f in futures]


def _table_artifact(key: str, rows: list[dict], description: str) -> None:
    if not rows:
        return
    try:
        create_table_artifact(key=key, table=rows, description=description)
    except Exception as e:  # no API (plain library use): the same rows are in the run store
        logging.getLogger(__name__).debug("table artifact %s not created: %s", key, e)


def _stage_summary(stats: dict[str, StageStats], plans: dict[str, StagePlan]) -> list[dict[str, Any]]:
    rows = []
    for name, s in stats.items():
        p = plans[name]
        rows.append({"stage": name, "units": len(p.units), "run": len(p.pending), "skipped": len(p.skipped),
                     "total": s.total, "kept": s.kept, "dropped": s.n_dropped,
                     "reasons": ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items())),
                     "seconds": round(s.seconds, 2)})
    return rows


def _run_artifacts(r: Recipe, store: RunStore, summary: dict, index: Path, uploaded: Optional[dict]) -> None:
    """Table artifacts of the mix report and the eval table, and a markdown artifact linking the report."""
    import json

    mix_report = store.path(layout.MIX_REPORT)
    if mix_report.exists():
        from pipeline.mix.report import table_rows

        _table_artifact("mix-report", table_rows(json.loads(mix_report.read_text())),
                        f"Mix of {r.name}: target vs realised share per bucket")
    results = store.path(layout.EVAL_RESULTS)
    if results.exists():
        _table_artifact("eval-zero-shot", json.loads(results.read_text()).get("rows") or [],
                        f"Zero-shot accuracy on the eval sources of {r.name}")
    lines = [f"# {r.name}", "",
             f"- report: [{index}]({index.as_uri()}) (open the file in a browser; no server needed)",
             f"- shards: `{store.path('shards')}` ({summary.get('n_shards')} shards, {summary.get('n_samples')} samples)",
             f"- recipe hash: `{r.sha}`"]
    if uploaded:
        lines.append(f"- uploaded to [{uploaded['repo_id']}]({uploaded['url']})")
    try:
        create_markdown_artifact(key="build-report", markdown="\n".join(lines), description=f"Report of {r.name}")
    except Exception as e:  # no API (plain library use): the report is on disk either way
        logging.getLogger(__name__).debug("markdown artifact not created: %s", e)


# ----------------------------- the flow -----------------------------
@flow(name="build-alive", log_prints=False)
def build_alive(recipe: str, out: str, overrides: Optional[dict[str, Any]] = None, progress: bool = True) -> dict:
    """Build the dataset described by ``recipe`` into the run folder ``out``.

    Args:
        recipe: path of the recipe YAML.
        out: run folder (created if missing; re-using it resumes / updates incrementally).
        overrides: dotted recipe keys to override, e.g. {"score.min_score": 0.3}.
        progress: show progress bars on stderr.
    """
    logger = get_run_logger()
    r = load_recipe(recipe, overrides)
    # every source is opened (cheaply, in parallel) first: one error naming every bad source, nothing ingested
    reports = preflight(r)
    logger.info("sources: %d checked, all ok", len(reports))
    store = RunStore(out)
    store.root.mkdir(parents=True, exist_ok=True)
    store.sweep_temp()  # half-written temp files of a killed earlier run
    import yaml

    write_text_atomic(store.path(layout.RECIPE),
                      f"# recipe hash: {r.sha}\n" + yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False))
    out_s = str(store.root)

    def on_stage(name: str, plan: StagePlan) -> None:
        logger.info("%s: %d units, %d to run, %d done%s", name, len(plan.units), len(plan.pending),
                    len(plan.skipped), f", {plan.pruned} removed" if plan.pruned else "")

    # shard tasks run where the recipe says (local threads/processes, or Ray): same bytes either way
    with task_runner_scope(r.runner):
        reports = drive(Executor(r, store), mapper=prefect_mapper(r, out_s, progress), on_stage=on_stage)
    stats = {k: v.stats for k, v in reports.items()}
    plans = {k: v.plan for k, v in reports.items()}
    models = models_used(r)
    from pipeline import write as writer

    summary = writer.summary(store)
    rows = _stage_summary(stats, plans)
    _table_artifact("stage-summary", rows, f"Stage summary of {r.name} ({store.root})")
    _table_artifact("describe-summary", stats["describe"].summary_rows(),
                    f"Describe ({models['describe']}): requests, tokens/s, cache hits, rejects")
    if r.score.enabled:
        from pipeline.score import load_summary, summary_rows

        _table_artifact("score-summary", summary_rows(load_summary(store)),
                        f"Score/filter decisions per source ({r.score.model})")
    index = store.path(layout.REPORT_INDEX)
    uploaded = None
    if r.upload.enabled:
        from pipeline import upload

        uploaded = upload.upload_run(store, r.upload.repo_id, private=r.upload.private,
                                     include_webdataset=r.upload.include_webdataset)
    _run_artifacts(r, store, summary, index, uploaded)
    return {"out": str(store.root), "stages": rows, "shards": summary.get("n_shards"),
            "samples": summary.get("n_samples"), "models": models,
            "describe_summary": describe.summary_lines(stats["describe"]) if r.describe.backend != "template" else [],
            "mix_table": _mix_table(store) if r.mix.enabled else None}


def _mix_table(store: RunStore) -> Optional[str]:
    from pipeline.mix import format_table, load_report, table_rows

    return format_table(table_rows(load_report(store)))


if __name__ == "__main__":
    import json

    print(json.dumps(build_alive(sys.argv[1], sys.argv[2]), indent=2, default=str))
