"""Mix stage over a run store (files, skip on unchanged input, stats) and the mixing-law sweep."""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import layout, mix, selection
from pipeline.executor import run_stages
from pipeline.mix import sweep as sweep_mod
from pipeline.mix.law import fit_all, law, read_results
from pipeline.recipe import parse_recipe
from pipeline.store import RunStore, write_parquet_atomic
from pipeline.tables import EXCLUDED, INGEST, MANIFEST, PAIRS

SOURCES = {  # name: (domain, {class: count}); None = unlabeled captioned rows
    "crops-a": ("crops", {"tomato leaf": 120, "potato leaf": 30}),
    "cattle": ("livestock", {"holstein": 40}),
    "web": ("general", {None: 200}),
}


def make_recipe(**mix_cfg):
    srcs = []
    for name, (dom, classes) in SOURCES.items():
        labelled = [c for c in classes if c is not None] or ["image"]
        srcs.append({"name": name, "kind": "synthetic", "domain": dom, "classes": labelled,
                     "captioned": dom == "general"})
    srcs.append({"name": "eval-gen", "kind": "synthetic", "domain": "general", "classes": ["q"], "role": "eval"})
    return parse_recipe({"name": "t", "seed": 3, "sources": srcs, "score": {"enabled": False}, "mix": mix_cfg})


def make_store(root) -> RunStore:
    """Ingest + pair parts as the upstream stages write them (no images needed by the mixer)."""
    store = RunStore(root)
    for name, (dom, classes) in SOURCES.items():
        rows = [(c, i) for c, n in classes.items() for i in range(n)]
        n = len(rows)
        uids = [f"{name}-{i:05d}" for i in range(n)]
        ing = {f.name: pa.nulls(n, f.type) for f in INGEST}
        ing.update({
            "uid": pa.array(uids), "source": pa.array([name] * n), "domain": pa.array([dom] * n),
            "role": pa.array(["train"] * n), "label": pa.array([c for c, _ in rows], pa.string()),
            "class_name": pa.array([c for c, _ in rows], pa.string()), "orig_id": pa.array([str(i) for i in range(n)]),
            "synthetic": pa.array([True] * n), "status": pa.array(["success"] * n),
        })
        write_parquet_atomic(store.path(layout.ingest_part(name, 0)), pa.table(ing, schema=INGEST))
        pairs = pa.table({"uid": uids, "candidates": [[f"a photo of {c or 'something'}"] for c, _ in rows],
                          "caption_source": ["template" if c else "original" for c, _ in rows]}, schema=PAIRS)
        write_parquet_atomic(store.path(layout.pair_part(name, 0)), pairs)
    return store


def run_mix(recipe, store):
    return run_stages(recipe, store, ["mix"])["mix"]


def test_run_writes_manifest_report_excluded_and_skips_when_unchanged(tmp_path):
    store = make_store(tmp_path / "run")
    recipe = make_recipe(shares={"crops": 0.5, "livestock": 0.2, "general": 0.3}, class_cap=60, total=150)
    stats = run_mix(recipe, store).stats
    man = pq.read_table(store.path("mix", "manifest.parquet"))
    rep = json.loads(store.path("mix", "mix_report.json").read_text())
    exc = pq.read_table(store.path(layout.excluded("mix", "all")))
    assert man.schema == MANIFEST and exc.schema == EXCLUDED
    # the stage is mix_table over the kept selection rows
    pool = selection.load(recipe, store, kept_only=True)
    expect, expect_rep = mix.mix_table(pool, recipe.mix, recipe.seed)
    assert man.equals(expect) and rep == json.loads(json.dumps(expect_rep))
    assert {b["bucket"]: b["rows"] for b in rep["buckets"]} == {"crops": 75, "livestock": 30, "general": 45}
    # every pool row is either in the manifest or excluded with a reason
    assert stats.total == 390 and stats.kept == man.num_rows and stats.kept + stats.n_dropped == 390
    assert set(exc["uid"].to_pylist()).isdisjoint(man["uid"].to_pylist())
    assert man.num_rows + exc.num_rows == 390
    assert set(exc["drop_reason"].to_pylist()) <= {"class_cap", "downsampled", "bucket_not_in_mix"}
    assert stats.counters["rows_out"] == 150 and stats.gauges["feasible"] == 1
    assert [r["bucket"] for r in mix.report_table(store)] == ["crops", "general", "livestock"]

    mtime = store.path("mix", "manifest.parquet").stat().st_mtime_ns
    again = run_mix(recipe, store)
    assert store.path("mix", "manifest.parquet").stat().st_mtime_ns == mtime and not again.plan.pending
    assert again.stats.to_dict()["counters"] == stats.to_dict()["counters"]

    changed = make_recipe(shares={"crops": 0.5, "livestock": 0.2, "general": 0.3}, class_cap=60, total=100)
    run_mix(changed, store)
    assert sum(pq.read_table(store.path("mix", "manifest.parquet"))["repeats"].to_pylist()) == 100


def test_run_error_policy_writes_the_report_then_raises(tmp_path):
    store = make_store(tmp_path / "run")
    recipe = make_recipe(shares={"crops": 0.2, "livestock": 0.6, "general": 0.2}, total=300, on_infeasible="error")
    with pytest.raises(mix.MixInfeasibleError, match="livestock"):
        run_mix(recipe, store)
    rep = json.loads(store.path("mix", "mix_report.json").read_text())
    assert rep["unmet"][0]["bucket"] == "livestock" and rep["closest_feasible"]["same_shares"]["total"] == 66
    assert not store.path("mix", "manifest.parquet").exists()
    assert not store.path(layout.marker("mix", "all")).exists()  # no marker: the next run tries again


def test_run_disabled_writes_nothing(tmp_path):
    store = make_store(tmp_path / "run")
    reports = run_stages(make_recipe(enabled=False), store, None)
    assert "mix" not in reports and not store.path("mix").exists()


def _fake_eval(recipe, store):
    """Stands in for shards + train + eval: accuracy follows known laws of the realised general share."""
    rep = mix.load_report(store)
    r = sum(b["realised_share"] for b in rep["buckets"] if b["domain"] == "general")
    crops = float(law(r, 0.9, -0.1, 3.0))
    gen = float(law(r, 0.7, -0.4, -5.0))
    return {"classifiers": ["template"],
            "tasks": [{"task": "ev-crops", "domain": "crops"}, {"task": "ev-gen", "domain": "general"}],
            "results": [
                {"model": "finetuned", "task": "ev-crops", "classifier": "template", "top1": crops},
                {"model": "finetuned", "task": "ev-gen", "classifier": "template", "top1": gen},
                {"model": "finetuned", "task": "ev-gen", "classifier": "both", "top1": 0.0},
                {"model": "base", "task": "ev-gen", "classifier": "template", "top1": 0.69},
            ]}


def test_sweep_builds_each_share_and_feeds_the_fit(tmp_path):
    store = make_store(tmp_path / "run")
    recipe = make_recipe(shares={"crops": 0.5, "livestock": 0.2, "general": 0.3})
    shares = [0.0, 0.1, 0.2, 0.35, 0.5]
    out = sweep_mod.sweep(recipe, store, shares, steps=[_fake_eval])
    rows = list(csv.DictReader(out.open()))
    assert [float(r["general_share"]) for r in rows] == shares
    for r in rows:  # each share's mix was built with general_share = r
        assert abs(float(r["realised_general_share"]) - float(r["general_share"])) < 0.01
        assert float(r["base_general"]) == 0.69
    child = RunStore(store.path("mixing_law", "share-0.2000"))
    assert pq.read_table(child.path("mix", "manifest.parquet")).num_rows > 0
    # upstream outputs are shared, not recomputed
    a, b = store.path(layout.ingest_part("web", 0)), child.path(layout.ingest_part("web", 0))
    assert os.path.samefile(a, b)
    res = read_results(out)
    assert res.base == {"general": 0.69}
    fits = fit_all(res)
    assert abs(fits["general"].t - (-5.0)) < 0.3 and abs(fits["crops"].c - 0.9) < 0.02


def test_sweep_without_the_train_stage_says_so(tmp_path, monkeypatch):
    store = make_store(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "pipeline.train", None)
    with pytest.raises(sweep_mod.SweepError, match="pipeline.train.train.run"):
        sweep_mod.sweep(make_recipe(), store, [0.1, 0.2, 0.3])


def test_domain_metrics_reads_the_eval_document():
    tuned, base = sweep_mod.domain_metrics({
        "classifiers": ["template", "both"],
        "tasks": [{"task": "a", "domain": "crops"}, {"task": "b", "domain": "crops"},
                  {"task": "c", "domain": "general"}],
        "results": [{"model": "finetuned", "task": "a", "classifier": "template", "top1": 0.5},
                    {"model": "finetuned", "task": "b", "classifier": "template", "top1": 0.7},
                    {"model": "finetuned", "task": "c", "classifier": "template", "top1": np.nan},
                    {"model": "finetuned", "task": "c", "classifier": "both", "top1": 0.9},
                    {"model": "base", "task": "a", "classifier": "template", "top1": 0.1}]})
    assert tuned == {"crops": pytest.approx(0.6)} and base == {"crops": 0.1}


@pytest.mark.slow
def test_sweep_end_to_end_with_the_real_writer_train_and_eval(tmp_path, prefect_harness, tiny_clip_dir):
    """Demo run (upstream stages), then a 3-share sweep with real shards, a few train steps and eval."""
    from flows.build_alive import build_alive
    from pipeline.recipe import load_recipe
    from tests.conftest import ROOT

    over = {"score.model": str(tiny_clip_dir), "train.model": str(tiny_clip_dir), "train.enabled": False,
            "eval.enabled": False}
    out = tmp_path / "demo"
    build_alive(str(ROOT / "recipes" / "demo.yaml"), str(out), over, False)
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", {**over, "train.max_steps": 2, "train.batch_size": 8,
                                                           "train.warmup_steps": 0})
    store = RunStore(out)
    path = sweep_mod.sweep(recipe, store, [0.0, 0.23, 0.5])
    rows = list(csv.DictReader(path.open()))
    assert [float(r["general_share"]) for r in rows] == [0.0, 0.23, 0.5]
    assert all(0 <= float(r["crops"]) <= 1 for r in rows)  # the demo's eval source is a crops task
    for share in ("0.0000", "0.2300", "0.5000"):
        child = RunStore(store.path("mixing_law", f"share-{share}"))
        assert (child.path("shards", "wds", "sizes.json")).exists() and child.path("eval", "results.json").exists()
    assert fit_all(read_results(path))["crops"].n == 3
