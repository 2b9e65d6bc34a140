import json
from pathlib import Path

import pytest
import yaml

from pipeline.recipe import RecipeError, load_recipe, parse_recipe, recipe_json_schema
from pipeline.tables import dump_all

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "sources": [{"name": "a", "kind": "synthetic", "domain": "crops", "classes": ["x"]}]}


def _write(tmp_path, data) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, {**BASE, "scroe": {"min_score": 0.3}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "scroe" in str(e.value) and str(p) in str(e.value) and "unknown key" in str(e.value)


def test_misspelled_nested_key(tmp_path):
    p = _write(tmp_path, {**BASE, "score": {"min_scor": 0.3}})
    with pytest.raises(RecipeError, match=r"score\.min_scor"):
        load_recipe(p)


def test_shares_must_sum_to_one():
    with pytest.raises(RecipeError, match="sum to 1"):
        parse_recipe({**BASE, "mix": {"shares": {"crops": 0.5, "general": 0.4}}})


def test_shares_name_real_buckets():
    with pytest.raises(RecipeError, match="no train source"):
        parse_recipe({**BASE, "mix": {"shares": {"crops": 0.5, "general": 0.5}}})


def test_wrong_type_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="image_size"):
        parse_recipe({**BASE, "image_size": "big"})
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_duplicate_source_names_and_bad_names():
    src = BASE["sources"][0]
    with pytest.raises(RecipeError, match="unique"):
        parse_recipe({**BASE, "sources": [src, src]})
    with pytest.raises(RecipeError, match="folder name"):
        parse_recipe({**BASE, "sources": [{**src, "name": "../evil"}]})


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    data = {**BASE, "sources": BASE["sources"] + [{"name": "f", "kind": "imagefolder", "domain": "livestock", "path": "imgs"}]}
    r = load_recipe(_write(tmp_path, data), {"score.min_score": 0.3, "seed": 5})
    assert r.score.min_score == 0.3 and r.seed == 5
    assert Path(r.source("f").path) == (tmp_path / "imgs").resolve()


def test_shipped_recipes_are_valid():
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(p)


def test_committed_recipe_schema_matches_model():
    committed = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
    assert committed == json.loads(json.dumps(recipe_json_schema())), "run `alive schema` and commit schemas/"


def test_committed_table_schemas_match():
    for name, text in dump_all().items():
        assert (ROOT / "schemas" / "tables" / f"{name}.json").read_text() == text, f"run `alive schema` ({name})"
