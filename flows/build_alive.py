"""The `build-alive` Prefect flow: every stage as tasks mapped over shards (never over samples).

No data logic lives here: each task calls one library function in ``pipeline/``, which skips units
whose done marker matches, so a re-run (or a retry) only redoes what is missing or changed.
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

from pipeline import describe, ingest, pair
from pipeline import write as writer
from pipeline.recipe import Recipe, load_recipe
from pipeline.runner import task_runner_scope
from pipeline.stats import StageStats, merge_all
from pipeline.store import RunStore, write_json_atomic, write_text_atomic

TRANSIENT = dict(retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
_POOL: Optional[ProcessPoolExecutor] = None
_POOL_SIZE = 0


def _pool(n: int) -> ProcessPoolExecutor:
    """One process pool per flow process: Pillow decode/resize is CPU-bound Python-side work."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != n:
        import multiprocessing as mp

        _POOL = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))
        _POOL_SIZE = n
    return _POOL


def _in_process_pool(recipe: Recipe) -> bool:
    """Local runs decode in a process pool; on Ray every task already runs in its own worker process."""
    return recipe.runner.kind == "local"


# ----------------------------- tasks (one per stage per shard) -----------------------------
@task(name="ingest-part", **TRANSIENT)
def ingest_task(recipe: Recipe, out: str, part) -> StageStats:
    store = RunStore(out)
    if _in_process_pool(recipe):
        return _pool(recipe.ingest.processes).submit(ingest.run_part, recipe, store, part).result()
    return ingest.run_part(recipe, store, part)


@task(name="describe-classes", **TRANSIENT)
def describe_task(recipe: Recipe, out: str) -> StageStats:
    store = RunStore(out)
    return describe.run(recipe, store, describe.collect_classes(recipe, store))


@task(name="pair-part", **TRANSIENT)
def pair_task(recipe: Recipe, out: str, source: str, part_path: str) -> StageStats:
    return pair.run_part(recipe, RunStore(out), source, Path(part_path))


@task(name="score-part", **TRANSIENT)
def score_task(recipe: Recipe, out: str, source: str, part_path: str) -> StageStats:
    from pipeline import score

    return score.run_part(recipe, RunStore(out), source, Path(part_path))


@task(name="score-finalize", **TRANSIENT)
def score_finalize_task(recipe: Recipe, out: str) -> StageStats:
    from pipeline import score

    return score.finalize(recipe, RunStore(out))


@task(name="mix", **TRANSIENT)
def mix_task(recipe: Recipe, out: str) -> StageStats:
    from pipeline import mix

    return mix.run(recipe, RunStore(out))


@task(name="write-plan", **TRANSIENT)
def write_plan_task(recipe: Recipe, out: str) -> writer.WritePlan:
    return writer.plan(recipe, RunStore(out))


@task(name="write-route-part", **TRANSIENT)
def route_task(recipe: Recipe, out: str, plan: writer.WritePlan, source: str, part_path: str) -> int:
    return writer.route_part(recipe, RunStore(out), plan, source, Path(part_path))


@task(name="write-shard", **TRANSIENT)
def shard_task(recipe: Recipe, out: str, plan: writer.WritePlan, shard: int) -> StageStats:
    return writer.write_shard(recipe, RunStore(out), plan, shard)


@task(name="write-finalize", **TRANSIENT)
def write_finalize_task(recipe: Recipe, out: str, plan: writer.WritePlan, models: dict) -> dict:
    return writer.finalize(recipe, RunStore(out), plan, models)


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


def models_used(recipe: Recipe) -> dict[str, str]:
    d = recipe.describe
    out = {"describe": "template baseline (no LLM)" if d.backend == "template" else f"{d.backend}: {d.model}"}
    if recipe.score.enabled:
        out["score"] = recipe.score.model
    for m in (recipe.score.model if recipe.score.enabled else None, d.model, recipe.train.model):
        if m and Path(m).is_dir() and (Path(m) / "alive_tiny.json").exists():
            out["untrained"] = "yes"
    return out


def _stage_summary(stats: dict[str, StageStats]) -> list[dict[str, Any]]:
    rows = []
    for s in stats.values():
        rows.append({"stage": s.stage, "total": s.total, "kept": s.kept, "dropped": s.n_dropped,
                     "reasons": ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items())),
                     "seconds": round(s.seconds, 2)})
    return rows


def _run_artifacts(r: Recipe, store: RunStore, summary: dict, index: Path, uploaded: Optional[dict]) -> None:
    """Table artifacts of the mix report and the eval table, and a markdown artifact linking the report."""
    import json

    mix_report = store.path("mix", "mix_report.json")
    if mix_report.exists():
        from pipeline.mix.report import table_rows

        _table_artifact("mix-report", table_rows(json.loads(mix_report.read_text())),
                        f"Mix of {r.name}: target vs realised share per bucket")
    results = store.path("eval", "results.json")
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
    store = RunStore(out)
    store.root.mkdir(parents=True, exist_ok=True)
    store.sweep_temp()  # half-written temp files of a killed earlier run
    import yaml

    write_text_atomic(store.path("recipe.resolved.yaml"),
                      f"# recipe hash: {r.sha}\n" + yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False))
    stats: dict[str, StageStats] = {}
    out_s = str(store.root)

    # shard tasks run where the recipe says (local threads/processes, or Ray): same bytes either way
    with task_runner_scope(r.runner):
        # ingest: one task per part of every source
        parts = ingest.plan(r, store)
        ingest.prune(r, store, parts)
        logger.info("ingest: %d parts over %d sources", len(parts), len(r.sources))
        stats["ingest"] = merge_all("ingest", _gather([ingest_task.submit(r, out_s, p) for p in parts], "ingest", progress))

        # describe: class-level (the LLM client inside is concurrent)
        stats["describe"] = describe_task(r, out_s)

        # pair: train parts only (eval sources never reach the shards)
        train_parts = ingest.ingested_parts(store, r, role="train")
        stats["pair"] = merge_all("pair", _gather(
            [pair_task.submit(r, out_s, s, str(p)) for s, p in train_parts], "pair", progress))

        if r.score.enabled:
            all_parts = ingest.ingested_parts(store, r)
            stats["score"] = merge_all("score", _gather(
                [score_task.submit(r, out_s, s, str(p)) for s, p in all_parts], "score", progress))
            stats["filter"] = score_finalize_task(r, out_s)

        if r.mix.enabled:
            stats["mix"] = mix_task(r, out_s)

        plan = write_plan_task(r, out_s)
        _gather([route_task.submit(r, out_s, plan, s, str(p)) for s, p in train_parts], "route", progress)
        stats["write"] = merge_all("write", _gather(
            [shard_task.submit(r, out_s, plan, i) for i in range(plan.n_shards)], "write", progress))
        models = models_used(r)
        summary = write_finalize_task(r, out_s, plan, models)

    if r.train.enabled:
        from pipeline.train import train as trainer

        summary["train"] = task(name="train", **TRANSIENT)(trainer.run)(r, store)
    if r.eval.enabled:
        from pipeline.train import evaluate

        summary["eval"] = task(name="eval", **TRANSIENT)(evaluate.run)(r, store)

    rows = _stage_summary(stats)
    _table_artifact("stage-summary", rows, f"Stage summary of {r.name} ({store.root})")
    _table_artifact("describe-summary", stats["describe"].summary_rows(),
                    f"Describe ({models['describe']}): requests, tokens/s, cache hits, rejects")
    if r.score.enabled:
        from pipeline.score import load_summary, summary_rows

        _table_artifact("score-summary", summary_rows(load_summary(store)),
                        f"Score/filter decisions per source ({r.score.model})")
    write_json_atomic(store.path("summary.json"), {
        "recipe": r.name, "recipe_hash": r.sha, "models": models,
        "stages": {k: v.to_dict() for k, v in stats.items()}, "shards": summary,
    })
    from pipeline import report

    index = report.build(r, store)
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
