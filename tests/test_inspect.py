"""`alive sources inspect` and the build's pre-flight, on local stand-ins of the real Hub datasets."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.recipe import parse_recipe
from pipeline.sources import SourceError
from pipeline.sources.inspect import format_report, inspect_recipe, inspect_source, preflight
from tests import hub_fixtures as fx


def _src(name, path, **kw):
    return {"name": name, "kind": "hf", "id": str(path), "split": "train", "domain": kw.pop("domain", "crops"), **kw}


def _recipe(*srcs):
    return parse_recipe({"name": "t", "sources": list(srcs)})


def test_inspect_reports_columns_counts_licence_and_what_the_recipe_does(tmp_path):
    root = fx.animals10(tmp_path / "animals10")
    r = _recipe(_src("animals10", root, domain="livestock", include_labels=["Chicken", "Cow", "Horse", "Sheep"],
                     class_names={"Cow": "dairy cow"}, max_samples=10, licence="GPL-2.0"))
    rep = inspect_source(r.sources[0])
    assert rep.ok and rep.format == "parquet" and rep.rows == 60
    assert (rep.image_column, rep.label_column) == ("image", "label")
    assert rep.labels == {c: 6 for c in fx.ANIMALS10} and rep.labels_from == "scan"
    assert rep.card_licence == "gpl-2.0" and not any("differs" in n for n in rep.notes)
    assert set(rep.keeps) == {"Chicken", "Cow", "Horse", "Sheep"} and rep.keeps["Cow"] == "dairy cow"
    assert rep.drops == {c: "label_not_included" for c in ["Butterfly", "Cat", "Dog", "Elephant", "Spider", "Squirrel"]}
    assert rep.renames == {"Cow": "dairy cow"}
    assert any("sample: stratified" in n for n in rep.notes)  # max_samples first on a 24-row pool
    text = format_report(rep)
    assert "labels (10, from scan): Butterfly 6" in text and "drops 6:" in text and "Cow -> dairy cow" in text


def test_inspect_without_scan_uses_the_classlabel_names(tmp_path):
    root = fx.cassava(tmp_path / "cassava")
    rep = inspect_source(_recipe(_src("cassava", root, config="full")).sources[0], scan=False)
    assert rep.ok and rep.labels == {n: None for n in fx.CASSAVA} and rep.labels_from == "features"


def test_every_failure_is_a_problem_of_its_source(tmp_path):
    r = _recipe(
        _src("cattle-ssfr", fx.cattle_ssfr(tmp_path / "cattle"), domain="livestock"),
        _src("amazonian-fish", fx.script_only(tmp_path / "fish"), domain="fishery"),
        _src("cassava", fx.cassava(tmp_path / "cassava"), config="full", class_names={"CBB": "cassava bacterial blight"}),
        _src("rice", fx.rice(tmp_path / "rice")),
        _src("animals10", fx.animals10(tmp_path / "animals10"), domain="livestock", include_labels=["Cow"]),
    )
    reps = {x.name: x for x in inspect_recipe(r)}
    assert [x.name for x in inspect_recipe(r)] == [s.name for s in r.sources]  # recipe order
    assert "image column only" in reps["cattle-ssfr"].problems[0]
    assert "loading script" in reps["amazonian-fish"].problems[0]
    assert "Cassava Bacterial Blight (CBB)" in reps["cassava"].problems[0]
    assert "several configs" in reps["rice"].problems[0]
    assert reps["animals10"].ok
    with pytest.raises(SourceError) as e:
        preflight(r)
    msg = str(e.value)
    assert msg.startswith("4 of 5 sources cannot be built")
    for name in ("cattle-ssfr", "amazonian-fish", "cassava", "rice"):
        assert f"  - {name} (hf " in msg
    assert "animals10" not in msg


def test_filters_that_keep_nothing_and_filters_on_caption_data(tmp_path):
    root = fx.animals10(tmp_path / "animals10")
    rep = inspect_source(_recipe(_src("a", root, exclude_labels=list(fx.ANIMALS10))).sources[0])
    assert any("keep none of its 10 labels" in p for p in rep.problems)
    syn = parse_recipe({"name": "t", "sources": [
        {"name": "s", "kind": "synthetic", "domain": "crops", "classes": ["a"]},
        {"name": "g", "kind": "synthetic", "domain": "general", "classes": ["car"], "captioned": True,
         "include_labels": ["bus"]}]})
    rep = inspect_source(syn.sources[1])
    assert any("include_labels names 'bus'" in p for p in rep.problems)


def test_imagefolder_and_missing_folder(tmp_path):
    root = tmp_path / "breeds"
    for c in ("Holstein", "Jersey"):
        (root / c).mkdir(parents=True)
        for i in range(3 if c == "Holstein" else 2):
            (root / c / f"{i}.jpg").write_bytes(fx.jpeg(i))
    r = parse_recipe({"name": "t", "sources": [
        {"name": "b", "kind": "imagefolder", "domain": "livestock", "path": str(root), "exclude_labels": ["Jersey"]},
        {"name": "m", "kind": "imagefolder", "domain": "livestock", "path": str(tmp_path / "nope")}]})
    b, m = inspect_recipe(r)
    assert b.ok and b.labels == {"Holstein": 3, "Jersey": 2} and b.drops == {"Jersey": "label_excluded"}
    assert not m.ok and "does not exist" in m.problems[0]


def _write(tmp_path, *srcs) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "sources": list(srcs)}))
    return str(p)


def test_cli_inspect_text_json_and_exit_code(tmp_path):
    recipe = _write(tmp_path, _src("animals10", fx.animals10(tmp_path / "animals10"), domain="livestock",
                                   include_labels=["Chicken"]),
                    _src("cattle-ssfr", fx.cattle_ssfr(tmp_path / "cattle"), domain="livestock"))
    runner = CliRunner()
    res = runner.invoke(app, ["sources", "inspect", recipe])
    assert res.exit_code == 1, res.output
    assert "animals10 [hf]" in res.output and "cattle-ssfr [hf]" in res.output and "FAILS" in res.output
    assert "1 of 2 sources ok; failing: ['cattle-ssfr']" in res.output
    res = runner.invoke(app, ["sources", "inspect", recipe, "--source", "animals10", "--json"])
    assert res.exit_code == 0, res.output
    (doc,) = json.loads(res.output)
    assert doc["ok"] and doc["labels"]["Chicken"] == 6 and list(doc["keeps"]) == ["Chicken"]
    res = runner.invoke(app, ["sources", "inspect", recipe, "--source", "nope"])
    assert res.exit_code == 1 and "no source named ['nope']" in res.output


def test_build_stops_before_any_work_naming_every_bad_source(tmp_path):
    recipe = _write(tmp_path, _src("fish", fx.script_only(tmp_path / "fish"), domain="fishery"),
                    _src("cattle", fx.cattle_ssfr(tmp_path / "cattle"), domain="livestock"))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["build", "-r", recipe, "-o", str(out), "--no-progress"])
    assert res.exit_code == 1
    assert "2 of 2 sources cannot be built" in res.output and "- fish" in res.output and "- cattle" in res.output
    assert not out.exists()


def test_alive_recipe_label_names_match_the_real_schemas(tmp_path):
    """recipes/alive.yaml's label control, pointed at stand-ins with the schemas the Hub cards give."""
    from pipeline.recipe import load_recipe
    from tests.conftest import ROOT

    alive = load_recipe(ROOT / "recipes" / "alive.yaml")
    stand_ins = {"animals10": fx.animals10(tmp_path / "animals10"), "cassava": fx.cassava(tmp_path / "cassava"),
                 "cattle-ssfr": fx.cattle_ssfr(tmp_path / "cattle"), "rice": fx.rice(tmp_path / "rice")}
    srcs = [alive.source(n).model_copy(update={"id": str(p)}) for n, p in stand_ins.items()]
    reports = {r.name: r for r in (inspect_source(s) for s in srcs)}
    assert all(r.ok for r in reports.values()), {n: r.problems for n, r in reports.items()}
    assert set(reports["animals10"].keeps) == {"Chicken", "Cow", "Horse", "Sheep"}
    assert reports["cassava"].keeps["Cassava Mosaic Disease (CMD)"] == "cassava mosaic disease"
    assert reports["cattle-ssfr"].keeps == {"cattle": "cattle"}
    assert reports["rice"].rows == 6  # the raw config, not the augmented one
    weeds = alive.source("deepweeds").model_copy(update={"id": str(fx.deepweeds(tmp_path / "deepweeds"))})
    rep = inspect_source(weeds)
    assert rep.ok and rep.drops == {"Negative": "label_excluded"} and rep.labels["Negative"] == 8
