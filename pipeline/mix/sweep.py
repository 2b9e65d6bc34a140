"""Mixing-law sweep: small train/eval runs at several general shares -> a results CSV for the fit.

Each share gets its own run folder ``<run>/mixing_law/share-0.2300/`` that shares the upstream
outputs (ingest, describe, pair, score, with their done markers) of the parent run through hard
links (a copy where links are impossible); its mix is built by the mix stage with the recipe
override ``mix.general_share = r``, then shards are written and the train and eval stages
(``pipeline.train``) run on it. Every step skips work its done markers already cover, so an
interrupted sweep resumes.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import layout
from ..recipe import Recipe
from ..store import RunStore, write_text_atomic

log = logging.getLogger(__name__)

# Outputs that depend on the mix: never shared between share folders.
DOWNSTREAM = frozenset({"mix", "write", "write-plan", "write-index", "shards", "train", "eval", "report",
                        "mixing_law", "upload", "summary.json"})
BOOKKEEPING = ("done", "stats", "excluded")

Step = Callable[[Recipe, RunStore], Any]


class SweepError(RuntimeError):
    """The sweep cannot run (a stage it needs is missing, or no eval source)."""


def share_recipe(recipe: Recipe, share: float) -> Recipe:
    """The recipe with ``mix.general_share = share`` (explicit shares dropped), training and eval on."""
    data = recipe.model_dump(mode="python")
    data["mix"].update({"enabled": True, "general_share": float(share), "shares": None})
    data["train"]["enabled"] = True
    data["eval"]["enabled"] = True
    return Recipe.model_validate(data)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        try:
            if os.path.samefile(src, dst):
                return
        except OSError:
            pass
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> int:
    n = 0
    for p in sorted(src.rglob("*")):
        if p.is_file() and not p.name.endswith(".tmp"):
            _link(p, dst / p.relative_to(src))
            n += 1
    return n


def share_store(store: RunStore, share: float) -> RunStore:
    """The run folder of one share, with the parent's upstream outputs linked in."""
    child = RunStore(store.path(layout.MIXING_LAW, f"share-{share:.4f}"))
    child.root.mkdir(parents=True, exist_ok=True)
    n = 0
    for entry in sorted(store.root.iterdir()):
        name = entry.name
        if name in DOWNSTREAM or name.startswith("."):
            continue
        if name in BOOKKEEPING and entry.is_dir():
            for sub in sorted(entry.iterdir()):
                if sub.name in DOWNSTREAM:
                    continue
                if sub.is_dir():
                    n += _link_tree(sub, child.root / name / sub.name)
                else:
                    _link(sub, child.root / name / sub.name)
                    n += 1
        elif entry.is_dir():
            n += _link_tree(entry, child.root / name)
        elif entry.is_file():
            _link(entry, child.root / name)
            n += 1
    log.info("mixing-law sweep: share %.4f uses %s (%d upstream files linked)", share, child.root, n)
    return child


def write_shards(recipe: Recipe, store: RunStore) -> dict:
    """The writer's steps in order (plan, route every train part, write every shard, finalize)."""
    from .. import write as writer

    return writer.write_all(recipe, store)


def default_steps() -> tuple[Step, Step, Step]:
    """(write shards, train, evaluate); a clear error when the train/eval stage is not available."""
    try:
        from ..train import evaluate as evaluator
        from ..train import train as trainer
    except ImportError as e:
        raise SweepError(
            "mixing-law sweep needs the train/eval stage (pipeline.train.train.run and "
            f"pipeline.train.evaluate.run), which is not importable here: {e}. Run the small trainings "
            "elsewhere and fit their results with `alive mixing-law fit RESULTS.csv`."
        ) from e
    for mod, name in ((trainer, "pipeline.train.train"), (evaluator, "pipeline.train.evaluate")):
        if not callable(getattr(mod, "run", None)):
            raise SweepError(f"{name} has no run(recipe, store) function")
    return write_shards, trainer.run, evaluator.run


def domain_metrics(doc: dict[str, Any], classifier: Optional[str] = None, metric: str = "top1"
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Mean ``metric`` per eval domain of the fine-tuned and of the base model from an eval document.

    The eval document has ``tasks`` (task, domain) and ``results`` (model, task, classifier, top1, top5).
    """
    domain_of = {t["task"]: t["domain"] for t in doc.get("tasks", [])}
    kinds = doc.get("classifiers") or []
    kind = classifier or (kinds[0] if kinds else None)
    per: dict[tuple[str, str], list[float]] = {}
    for r in doc.get("results", []):
        if kind is not None and r.get("classifier") != kind:
            continue
        dom = domain_of.get(r.get("task"))
        v = r.get(metric)
        if dom is None or v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        per.setdefault((r["model"], dom), []).append(float(v))
    tuned = {d: float(np.mean(v)) for (m, d), v in sorted(per.items()) if m == "finetuned"}
    base = {d: float(np.mean(v)) for (m, d), v in sorted(per.items()) if m == "base"}
    return tuned, base


def sweep(recipe: Recipe, store: RunStore, shares: Sequence[float], results_csv: Optional[Path] = None,
          steps: Optional[Sequence[Step]] = None, classifier: Optional[str] = None, metric: str = "top1") -> Path:
    """Run the mix + shards + train + eval at each general share and write the results CSV.

    Args:
        recipe: The run's recipe (its upstream stages must be done in ``store``).
        store: The parent run store.
        shares: General shares to try, each in [0, 1].
        results_csv: Where the CSV goes (default ``<run>/mixing_law/results.csv``).
        steps: What runs after the mix in each share's folder: callables ``(recipe, store)``, the last
            one returning the eval document; default :func:`default_steps`.
        classifier: Eval classifier kind whose accuracy is used (default the recipe's first).
        metric: ``top1`` or ``top5``.

    Returns:
        The CSV path: columns general_share, realised_general_share, one per eval domain (fine-tuned
        model) and base_<domain> (base model).
    """
    from ..executor import run_stages
    from .stage import STAGE, load_report

    bad = [s for s in shares if not 0 <= s <= 1]
    if bad:
        raise ValueError(f"general shares must be within [0, 1], got {bad}")
    if not any(s.role == "eval" for s in recipe.sources):
        raise SweepError("mixing-law sweep needs at least one source with role: eval (the metrics come from it)")
    run_steps = list(steps) if steps is not None else list(default_steps())
    results_csv = results_csv or store.path(layout.MIXING_LAW, "results.csv")
    rows: list[dict[str, Any]] = []
    for share in sorted(set(float(s) for s in shares)):
        r_recipe = share_recipe(recipe, share)
        child = share_store(store, share)
        run_stages(r_recipe, child, [STAGE])
        rep = load_report(child)
        realised = sum(b["realised_share"] for b in rep["buckets"] if b["domain"] == "general")
        out: Any = None
        for step in run_steps:
            out = step(r_recipe, child)
        if not isinstance(out, dict):
            raise SweepError(f"the last sweep step returned {type(out).__name__}, not the eval document")
        tuned, base = domain_metrics(out, classifier, metric)
        row = {"general_share": share, "realised_general_share": round(realised, 6), **tuned,
               **{f"base_{d}": v for d, v in base.items()}}
        rows.append(row)
        log.info("mixing-law sweep: share %.4f -> %s", share, tuned)
        _write_csv(results_csv, rows)  # after every share: an interrupted sweep keeps what it has
    return results_csv


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in cols})
    write_text_atomic(path, buf.getvalue())
