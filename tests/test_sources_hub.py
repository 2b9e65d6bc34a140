"""hf sources built from local stand-ins of the real Hub datasets: label control, sampling, planning, errors."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ingest, layout, sources
from pipeline import write as writer
from pipeline.executor import run_stages
from pipeline.recipe import RecipeError, parse_recipe
from pipeline.sources.inspect import preflight
from pipeline.store import RunStore
from tests import hub_fixtures as fx


def _recipe(*srcs: dict, **kw):
    return parse_recipe({"name": "t", "seed": kw.pop("seed", 0), "image_size": 32, "sources": list(srcs),
                         "ingest": {"part_size": kw.pop("part_size", 4)}, **kw})


def _hf(name: str, path, **kw) -> dict:
    return {"name": name, "kind": "hf", "id": str(path), "split": "train", "domain": kw.pop("domain", "crops"), **kw}


def _ingested(r, store) -> pa.Table:
    run_stages(r, store, ["ingest"])
    return pa.concat_tables(pq.read_table(store.path(layout.ingest_part(s, i))) for s, i in ingest.ingested_parts(store, r))


def _excluded(store) -> pa.Table:
    files = sorted(store.path("excluded", "ingest").rglob("*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files) if files else pa.table({"drop_reason": []})


def test_include_labels_keep_exactly_those_and_record_the_rest(tmp_path):
    root = fx.animals10(tmp_path / "animals10")
    keep = ["Chicken", "Cow", "Horse", "Sheep"]
    r = _recipe(_hf("animals10", root, domain="livestock", include_labels=keep))
    store = RunStore(tmp_path / "run")
    t = _ingested(r, store)
    assert sorted(set(t["label"].to_pylist())) == keep and t.num_rows == 4 * 6
    ex = _excluded(store)
    assert ex.num_rows == 6 * 6 and set(ex["drop_reason"].to_pylist()) == {"label_not_included"}
    assert {d.split("'")[1] for d in ex["detail"].to_pylist()} == set(fx.ANIMALS10) - set(keep)
    assert not set(ex["uid"].to_pylist()) & set(t["uid"].to_pylist())
    assert not store.path(layout.INGEST_SPOOL).exists()  # planned from footers, nothing spooled


def test_stratified_max_samples_keeps_every_class_of_a_class_sorted_source(tmp_path):
    root = fx.animals10(tmp_path / "animals10")
    keep = ["Chicken", "Cow", "Horse", "Sheep"]
    base = _hf("animals10", root, domain="livestock", include_labels=keep, max_samples=8)
    first = _ingested(_recipe(base), RunStore(tmp_path / "first"))
    assert Counter(first["label"].to_pylist()) == {"Chicken": 6, "Cow": 2}  # the cut the issue describes
    strat = _ingested(_recipe({**base, "sample": "stratified"}), RunStore(tmp_path / "s1"))
    assert Counter(strat["label"].to_pylist()) == {c: 2 for c in keep}
    again = _ingested(_recipe({**base, "sample": "stratified"}), RunStore(tmp_path / "s2"))
    assert again["uid"].to_pylist() == strat["uid"].to_pylist()  # deterministic
    other = _ingested(_recipe({**base, "sample": "stratified"}, seed=7), RunStore(tmp_path / "s3"))
    assert Counter(other["label"].to_pylist()) == {c: 2 for c in keep}
    assert set(other["uid"].to_pylist()) != set(strat["uid"].to_pylist())  # the seed picks the rows


def test_hf_parquet_parts_are_row_subsets_read_in_the_units(tmp_path):
    root = fx.animals10(tmp_path / "animals10")
    r = _recipe(_hf("animals10", root, domain="livestock", exclude_labels=["Spider"]), part_size=10)
    parts = ingest.plan(r, RunStore(tmp_path / "run"))
    assert {p.reader for p in parts} == {"parquet_rows"}
    assert {p.args["file"].rsplit("/", 1)[1] for p in parts} == {"train-00000-of-00002.parquet",
                                                                   "train-00001-of-00002.parquet"}
    assert sum(p.count for p in parts) == 54
    assert sum(len(p.args["excluded"]) for p in parts) == 6
    assert all(len(p.args["rows"]) <= 10 for p in parts)


def test_class_names_keyed_on_names_the_source_lacks_is_an_error_naming_the_closest(tmp_path):
    root = fx.cassava(tmp_path / "cassava")
    short = {"CBB": "cassava bacterial blight", "CMD": "cassava mosaic disease", "Healthy": "healthy cassava leaf"}
    r = _recipe(_hf("cassava", root, config="full", class_names=short))
    with pytest.raises(sources.SourceError) as e:
        ingest.plan(r, RunStore(tmp_path / "run"))
    msg = str(e.value)
    assert "'CBB'" in msg and "Cassava Bacterial Blight (CBB)" in msg and "'CMD'" in msg
    assert "Cassava Mosaic Disease (CMD)" in msg and "'Healthy'" not in msg.split("names")[-1]
    with pytest.raises(sources.SourceError, match="cassava.*CBB.*Cassava Bacterial Blight"):
        preflight(r)
    real = {"Cassava Bacterial Blight (CBB)": "cassava bacterial blight", "Healthy": "healthy cassava leaf"}
    t = _ingested(_recipe(_hf("cassava", root, config="full", class_names=real)), RunStore(tmp_path / "ok"))
    names = dict(zip(t["label"].to_pylist(), t["class_name"].to_pylist()))
    assert names["Cassava Bacterial Blight (CBB)"] == "cassava bacterial blight"
    assert names["Healthy"] == "healthy cassava leaf"
    assert names["Cassava Green Mottle (CGM)"] == "cassava green mottle (cgm)"


def test_misspelled_include_and_exclude_names_are_errors(tmp_path):
    root = fx.animals10(tmp_path / "animals10")
    r = _recipe(_hf("animals10", root, domain="livestock", include_labels=["chicken", "Cow"], exclude_labels=["Spyder"]))
    with pytest.raises(sources.SourceError) as e:
        ingest.plan(r, RunStore(tmp_path / "run"))
    assert "include_labels names 'chicken'" in str(e.value) and "'Chicken'" in str(e.value)
    assert "exclude_labels names 'Spyder'" in str(e.value) and "'Spider'" in str(e.value)


def test_label_rules_that_contradict_each_other_are_recipe_errors():
    with pytest.raises(RecipeError, match="both included and excluded"):
        _recipe({"name": "s", "kind": "synthetic", "domain": "crops", "classes": ["a", "b"],
                 "include_labels": ["a"], "exclude_labels": ["a"]})
    with pytest.raises(RecipeError, match="renames excluded labels"):
        _recipe({"name": "s", "kind": "synthetic", "domain": "crops", "classes": ["a", "b"],
                 "exclude_labels": ["a"], "class_names": {"a": "x"}})


def test_image_only_dataset_is_a_clear_error_and_fixed_label_builds_it(tmp_path):
    root = fx.cattle_ssfr(tmp_path / "cattle")
    r = _recipe(_hf("cattle-ssfr", root, domain="livestock"))
    with pytest.raises(sources.SourceError, match="image column only.*fixed_label.*caption_column"):
        ingest.plan(r, RunStore(tmp_path / "run"))
    t = _ingested(_recipe(_hf("cattle-ssfr", root, domain="livestock", fixed_label="cattle")), RunStore(tmp_path / "ok"))
    assert t.num_rows == 5 and set(t["class_name"].to_pylist()) == {"cattle"}
    assert set(t["status"].to_pylist()) == {"success"}


def test_loading_script_dataset_names_the_ways_out(tmp_path):
    root = fx.script_only(tmp_path / "amazonian_fish_classifier_data")
    r = _recipe(_hf("amazonian-fish", root, domain="fishery"))
    with pytest.raises(sources.SourceError) as e:
        ingest.plan(r, RunStore(tmp_path / "run"))
    msg = str(e.value)
    assert "loading script" in msg and "amazonian_fish_classifier_data.py" in msg
    assert "refs/convert/parquet" in msg and "kind: parquet" in msg and "kind: urls" in msg


def test_raw_and_augmented_configs(tmp_path):
    root = fx.rice(tmp_path / "rice")
    with pytest.raises(sources.SourceError, match=r"several configs \['raw', 'augmented'\].*'config'"):
        ingest.plan(_recipe(_hf("rice", root)), RunStore(tmp_path / "run"))
    raw = _ingested(_recipe(_hf("rice", root, config="raw")), RunStore(tmp_path / "raw"))
    aug = _ingested(_recipe(_hf("rice", root, config="augmented")), RunStore(tmp_path / "aug"))
    assert raw.num_rows == 6 and aug.num_rows == 18
    with pytest.raises(sources.SourceError, match="no split 'test'.*\\['train'\\]"):
        ingest.plan(_recipe({**_hf("rice", root, config="raw"), "split": "test"}), RunStore(tmp_path / "x"))


def test_save_to_disk_dataset_excludes_negative_rows(tmp_path):
    root = fx.deepweeds(tmp_path / "deepweeds")
    store = RunStore(tmp_path / "run")
    t = _ingested(_recipe(_hf("deepweeds", root, exclude_labels=["Negative"])), store)
    assert t.num_rows == 16 and "Negative" not in set(t["label"].to_pylist())
    ex = _excluded(store)
    assert ex.num_rows == 8 and set(ex["drop_reason"].to_pylist()) == {"label_excluded"}
    assert all("exclude_labels" in d for d in ex["detail"].to_pylist())


def _tar(path, n, start=0):
    import io

    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            for ext, data in (("jpg", fx.jpeg(i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_pattern_need_not_exist_in_full_and_max_samples_opens_only_what_it_needs(tmp_path):
    for k in range(3):
        _tar(tmp_path / f"cc-{k:04d}.tar", 5, start=5 * k)
    src = {"name": "cc", "kind": "webdataset", "domain": "general", "path": str(tmp_path / "cc-{0000..0575}.tar"),
           "caption_key": "txt", "label_key": None, "max_samples": 7}
    parts = ingest.plan(_recipe(src), RunStore(tmp_path / "run"))
    assert sorted({p.args["url"].rsplit("/", 1)[1] for p in parts}) == ["cc-0000.tar", "cc-0001.tar"]
    t = _ingested(_recipe(src), RunStore(tmp_path / "run"))
    assert t.num_rows == 7 and t["caption"].to_pylist() == [f"caption {i}" for i in range(7)]
    full = _ingested(_recipe({**src, "max_samples": None}), RunStore(tmp_path / "all"))
    assert full.num_rows == 15


def test_include_exclude_recipe_builds_shards_with_exactly_the_kept_classes(tmp_path):
    animals, weeds = fx.animals10(tmp_path / "animals10"), fx.deepweeds(tmp_path / "deepweeds")
    r = _recipe(
        _hf("animals10", animals, domain="livestock", include_labels=["Chicken", "Cow", "Horse", "Sheep"],
            class_names={"Cow": "cow"}),
        _hf("deepweeds", weeds, exclude_labels=["Negative"], class_names={"Chinee apple": "chinee apple weed"}),
        score={"enabled": False}, mix={"enabled": False}, write={"samples_per_shard": 16})
    store = RunStore(tmp_path / "run")
    run_stages(r, store, ["ingest", "describe", "pair"])
    writer.write_all(r, store)
    got = Counter()
    for tar in sorted(store.path("shards", "wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    got[(meta["source"], meta["label"], meta["class_name"])] += 1
    want_weeds = [c for c in fx.DEEPWEEDS if c != "Negative"]
    assert {k[1] for k in got if k[0] == "animals10"} == {"Chicken", "Cow", "Horse", "Sheep"}
    assert {k[1] for k in got if k[0] == "deepweeds"} == set(want_weeds)
    assert sum(got.values()) == 24 + 16
    assert ("animals10", "Cow", "cow") in got and ("deepweeds", "Chinee apple", "chinee apple weed") in got


def test_parquet_and_imagefolder_sources_take_the_same_label_control(tmp_path):
    root = fx.animals10(tmp_path / "animals10")
    store = RunStore(tmp_path / "pq")
    t = _ingested(_recipe({"name": "pq", "kind": "parquet", "domain": "livestock", "path": str(root / "data"),
                           "exclude_labels": ["Cat", "Dog"], "max_samples": 16, "sample": "stratified"}), store)
    assert "Cat" not in t["label"].to_pylist() and t.num_rows == 16  # ClassLabel ints read as their names
    assert set(t["label"].to_pylist()) == set(fx.ANIMALS10) - {"Cat", "Dog"}
    assert _excluded(store).num_rows == 12
    folder = tmp_path / "breeds"
    for c, n in (("Holstein", 4), ("Jersey", 3)):
        (folder / c).mkdir(parents=True)
        for i in range(n):
            (folder / c / f"{i}.jpg").write_bytes(fx.jpeg(i))
    store = RunStore(tmp_path / "folder")
    t = _ingested(_recipe({"name": "f", "kind": "imagefolder", "domain": "livestock", "path": str(folder),
                           "include_labels": ["Jersey"]}), store)
    assert t["label"].to_pylist() == ["Jersey"] * 3
    assert _excluded(store)["drop_reason"].to_pylist() == ["label_not_included"] * 4


def _wds_dataset(root):
    """A Hub dataset stored as webdataset tars (DeepFish's format): image + a text label member per key."""
    import io

    root.mkdir(parents=True)
    for k in range(2):
        with tarfile.open(root / f"train-{k:04d}.tar", "w") as tf:
            for i in range(4):
                for ext, data in (("jpg", fx.jpeg(10 * k + i)), ("label.txt", [b"fish", b"no fish"][i % 2])):
                    info = tarfile.TarInfo(f"{k}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


def test_other_hub_formats_read_one_shard_per_unit_and_filter_as_read(tmp_path):
    from pipeline.sources.inspect import inspect_source

    root = _wds_dataset(tmp_path / "deepfish")
    src = _hf("deepfish", root, domain="fishery", label_column="label.txt", exclude_labels=["no fish"])
    parts = ingest.plan(_recipe(src), RunStore(tmp_path / "run"))
    assert [p.reader for p in parts] == ["hf_stream", "hf_stream"]  # one unit per data-file shard
    store = RunStore(tmp_path / "run")
    t = _ingested(_recipe(src), store)
    assert t["label"].to_pylist() == ["fish"] * 4 and set(t["status"].to_pylist()) == {"success"}
    assert _excluded(store)["drop_reason"].to_pylist() == ["label_excluded"] * 4
    with pytest.raises(sources.SourceError, match="stratified needs every row's label"):
        ingest.plan(_recipe({**src, "max_samples": 2, "sample": "stratified"}), RunStore(tmp_path / "x"))
    rep = inspect_source(_recipe({**src, "exclude_labels": ["dolphin"]}).sources[0])
    assert rep.ok and rep.labels_from == "peek" and any("'dolphin'" in n for n in rep.notes)
