"""Zero-shot eval: accuracy maths with known answers, classifier construction, outputs, errors, CLI.

The learning proof (a trained tiny CLIP far above chance) lives in test_train.py; here the model is
the untrained tiny CLIP, so only the mechanics are asserted, never its accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline import layout
from pipeline.recipe import parse_recipe
from pipeline.store import RunStore, write_parquet_atomic
from pipeline.tables import INGEST
from pipeline.executor import run_stages
from pipeline.train import evaluate as E

CLASSES = ["red clover", "white clover", "green gram"]


def recipe_dict(with_eval: bool = True) -> dict:
    sources = [{"name": "syn", "kind": "synthetic", "domain": "crops", "classes": CLASSES, "per_class": 2, "size": 64}]
    if with_eval:
        sources.append({"name": "held", "kind": "synthetic", "domain": "crops", "role": "eval", "classes": CLASSES,
                        "per_class": 4, "size": 64, "seed": 3})
    return {"name": "eval-test", "image_size": 64, "sources": sources, "eval": {"batch_size": 5}}


def ingest_eval(recipe, store: RunStore) -> None:
    run_stages(recipe, store, ["ingest"])


def test_topk_accuracy_known_answers():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.5, 0.4, 0.3]])
    labels = np.array([0, 1, 1, 2])
    acc = E.topk_accuracy(logits, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(2 / 4)  # rows 0 and 2
    assert acc[2] == pytest.approx(3 / 4)  # row 1's label is second; row 3's is last
    assert acc[5] == 1.0  # k capped at the class count
    assert np.isnan(E.topk_accuracy(np.zeros((0, 3)), np.zeros(0, np.int64))[1])


def test_class_weights_are_the_normalised_mean_of_normalised_sentences():
    emb = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([0.0, 1.0], np.float32),
           "c": np.array([-1.0, 0.0], np.float32)}
    w = E.class_weights([["a", "b"], ["c"]], emb)
    np.testing.assert_allclose(w, [[2 ** -0.5, 2 ** -0.5], [-1.0, 0.0]], rtol=1e-6)


def test_class_sentences_per_kind_with_fallback():
    task = E.Task("t", "livestock", ["ewe", "ox"], [], np.zeros(0, np.int64))
    templates = {"livestock": ["a photo of {a_class}, a type of livestock.", "a side view photo of {a_class}."],
                 "general": ["a photo of {a_class}."]}
    desc = {("livestock", "ox"): ["An ox is a large, strong bovine.", "a side view photo of an ox."]}
    tpl, fb = E.class_sentences("template", task, templates, desc)
    assert tpl[0] == ["a photo of a ewe, a type of livestock.", "a side view photo of a ewe."] and fb == 0
    d, fb = E.class_sentences("descriptions", task, templates, desc)
    assert d == [tpl[0], desc[("livestock", "ox")]] and fb == 1  # the ewe has no description
    both, _ = E.class_sentences("both", task, templates, desc)
    # union without repeats: the shared sentence appears once
    assert both[1] == ["a photo of an ox, a type of livestock.", "a side view photo of an ox.",
                       "An ox is a large, strong bovine."]
    assert E.template_sentences(templates, "fishery", "carp") == ["a photo of a carp."]


def test_eval_run_outputs_and_bad_images(tmp_path, tiny_clip_dir):
    recipe = parse_recipe(recipe_dict())
    store = RunStore(tmp_path / "run")
    ingest_eval(recipe, store)
    # A row that claims success but holds bytes no decoder reads, and a failed ingest row.
    bad = {f.name: None for f in INGEST}
    bad.update(uid="u-bad", source="held", domain="crops", role="eval", label="red clover", class_name="red clover",
               orig_id="x", image=b"\xff\xd8 broken", synthetic=True, status="success")
    failed = {**bad, "uid": "u-failed", "orig_id": "y", "image": None, "status": "failed_to_decode", "error": "e"}
    write_parquet_atomic(store.path(layout.ingest_part("held", 1)), pa.Table.from_pylist([bad, failed], schema=INGEST))

    res = E.run(recipe, store, models={"tiny": str(tiny_clip_dir)})
    n = len(CLASSES) * 4
    assert res["tasks"][0]["n_images"] == n + 1 and res["tasks"][0]["failed_ingest"] == 1
    assert {r["classifier"] for r in res["results"]} == {"template", "descriptions", "both"}
    for r in res["results"]:
        assert r["n_images"] == n and r["n_classes"] == 3 and 0 <= r["top1"] <= r["top5"] == 1.0
    # No describe output: descriptions fall back to the templates for every class, and say so.
    by = {r["classifier"]: r for r in res["results"]}
    assert by["descriptions"]["fallback_classes"] == 3 and by["descriptions"]["top1"] == by["template"]["top1"]
    assert res["description_backend"] is None and "fell back" in res["description_note"]
    stats = store.read_stats("eval")
    assert stats.dropped["failed_to_decode"] == 1 and stats.total == n + 1 and stats.kept == n
    md = store.path("eval", "results.md").read_text()
    assert "tiny top-1" in md and "Δ" not in md and md.count("\n| held |") == 3
    assert store.path("eval", "zero_shot.png").stat().st_size > 1000
    assert [r["task"] for r in res["rows"]] == ["held"] * 3 + ["mean"] * 3


def test_side_by_side_rows_and_markdown():
    doc = {
        "models": {"base": "b", "finetuned": "f"}, "classifiers": ["template"], "description_note": "n",
        "tasks": [{"task": "a", "n_images": 10, "n_classes": 2}, {"task": "b", "n_images": 4, "n_classes": 4}],
        "results": [{"model": m, "task": t, "classifier": "template", "top1": v, "top5": 1.0}
                    for m, t, v in [("base", "a", 0.5), ("finetuned", "a", 0.8), ("base", "b", 0.25),
                                    ("finetuned", "b", 0.75)]],
    }
    doc["mean"] = E._means(doc["results"])
    rows = E.side_by_side(doc)
    assert [r["task"] for r in rows] == ["a", "b", "mean"]
    assert rows[0]["delta_top1"] == pytest.approx(0.3) and rows[2]["finetuned_top1"] == pytest.approx(0.775)
    md = E.markdown({**doc, "rows": rows})
    assert "| a | template | 10 | 2 | 50.0 | 80.0 | +30.0 | 100.0 | 100.0 |" in md
    assert "| **mean** | template |  |  | 37.5 | 77.5 | +40.0 |" in md


def test_eval_errors_name_the_fix(tmp_path, tiny_clip_dir):
    store = RunStore(tmp_path / "run")
    with pytest.raises(ValueError, match="role: eval"):
        E.run(parse_recipe(recipe_dict(with_eval=False)), store, models={"m": str(tiny_clip_dir)})
    with pytest.raises(ValueError, match="run ingest first"):
        E.run(parse_recipe(recipe_dict()), store, models={"m": str(tiny_clip_dir)})
    ingest_eval(parse_recipe(recipe_dict()), store)
    with pytest.raises(ValueError, match="could not be loaded"):
        E.run(parse_recipe(recipe_dict()), store, models={"m": str(tmp_path / "no-such-model")})


def test_cli_eval_and_train(tmp_path, tiny_clip_dir):
    from typer.testing import CliRunner

    from pipeline.train.cli import app

    rec = tmp_path / "recipe.yaml"
    rec.write_text(yaml.safe_dump(recipe_dict()))
    out = tmp_path / "run"
    ingest_eval(parse_recipe(recipe_dict()), RunStore(out))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--recipe", str(rec), "--out", str(out), "--model", f"tiny={tiny_clip_dir}",
                              "--no-verbose"])
    assert res.exit_code == 0, res.output
    assert "| held | template |" in res.output
    assert json.loads((out / "eval" / "results.json").read_text())["models"] == {"tiny": str(tiny_clip_dir)}
    res = runner.invoke(app, ["train", "--recipe", str(rec), "--out", str(out), "--no-verbose"])
    assert res.exit_code == 1 and "sizes.json" in res.output
    res = runner.invoke(app, ["train", "--recipe", str(rec), "--out", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["eval", "--recipe", str(rec), "--out", str(out), "--set", "eval.bogus=1"])
    assert res.exit_code == 2 and "eval.bogus" in res.output


def test_trained_configurations_side_by_side(tmp_path):
    """Several fine-tuned models: one column each, a Δ against base each, their objectives named."""
    for name, conf in (("clip", "clip"), ("dalip", "dalip"), ("old", None)):
        d = tmp_path / name
        d.mkdir()
        if conf is not None:
            (d / "train_summary.json").write_text(json.dumps({"configuration": conf}))
    (tmp_path / "old" / "train_summary.json").write_text(json.dumps({"steps": 3}))  # before objectives: plain CLIP
    assert E.training_configuration(str(tmp_path / "dalip")) == "dalip"
    assert E.training_configuration(str(tmp_path / "old")) == "clip"
    assert E.training_configuration("openai/clip-vit-base-patch32") is None
    models = {"base": "b", "clip": str(tmp_path / "clip"), "dalip": str(tmp_path / "dalip")}
    acc = {("base", "template"): 0.25, ("clip", "template"): 0.5, ("dalip", "template"): 0.75,
           ("base", "descriptions"): 0.25, ("clip", "descriptions"): 0.5, ("dalip", "descriptions"): 0.5,
           ("base", "both"): 0.25, ("clip", "both"): 0.625, ("dalip", "both"): 0.875}
    doc = {
        "models": models, "configurations": {k: E.training_configuration(v) for k, v in models.items()},
        "classifiers": ["template", "descriptions", "both"], "description_note": "n",
        "classifier_labels": {k: E.classifier_label(k, "openai") for k in ("template", "descriptions", "both")},
        "tasks": [{"task": "a", "n_images": 8, "n_classes": 4}],
        "results": [{"model": m, "task": "a", "classifier": c, "top1": v, "top5": 1.0} for (m, c), v in acc.items()],
    }
    doc["mean"] = E._means(doc["results"])
    doc["rows"] = E.side_by_side(doc)
    r = doc["rows"][0]
    assert r["dalip_delta_top1"] == pytest.approx(0.5) and r["clip_delta_top1"] == pytest.approx(0.25)
    assert "delta_top1" not in r  # no model named finetuned
    md = E.markdown(doc)
    assert "| Δ clip top-1 | Δ dalip top-1 |" in md
    assert "| a | template | 8 | 4 | 25.0 | 50.0 | 75.0 | +25.0 | +50.0 |" in md
    assert "| a | CuPL | 8 | 4 |" in md and "| a | combined | 8 | 4 | 25.0 | 62.5 | 87.5 | +37.5 | +62.5 |" in md
    assert "(trained: dalip)" in md and "(trained: clip)" in md
    assert E.classifier_label("descriptions", "template") == "descriptions (template baseline)"
