"""Every source kind read offline from data the test makes; broken sources give clear errors."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import ingest, layout, sources
from pipeline.executor import run_stages
from pipeline.recipe import parse_recipe
from pipeline.store import RunStore
from tests.hostile import write_hostile_folder


def _jpeg(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _recipe(src: dict, **kw):
    return parse_recipe({"name": "t", "sources": [src], "ingest": {"part_size": 4}, **kw})


def _ingest_all(r, store) -> pa.Table:
    run_stages(r, store, ["ingest"])
    return pa.concat_tables(pq.read_table(store.path(layout.ingest_part(s, i)))
                            for s, i in ingest.ingested_parts(store, r))


def test_imagefolder_hostile_corpus_every_sample_accounted(tmp_path):
    expected = write_hostile_folder(tmp_path / "imgs")
    r = _recipe({"name": "hostile", "kind": "imagefolder", "domain": "crops", "path": str(tmp_path / "imgs")})
    t = _ingest_all(r, RunStore(tmp_path / "run"))
    got = dict(zip(t["orig_id"].to_pylist(), t["status"].to_pylist()))
    assert got == expected  # nothing lost, nothing invented, each with the right status
    assert len(set(t["uid"].to_pylist())) == t.num_rows
    failed = t.filter(pa.compute.not_equal(t["status"], "success"))
    assert all(failed["error"].to_pylist())
    assert "ünïcødé сорт" in set(t["class_name"].to_pylist())


def test_parquet_source_with_hf_image_struct(tmp_path):
    imgs = [{"bytes": _jpeg((i * 40, 0, 0)), "path": None} for i in range(6)]
    pq.write_table(pa.table({"img": imgs, "species": ["a", "b"] * 3}), tmp_path / "d.parquet")
    r = _recipe({"name": "pq", "kind": "parquet", "domain": "fishery", "path": str(tmp_path / "d.parquet"),
                 "image_column": "img", "label_column": "species"})
    t = _ingest_all(r, RunStore(tmp_path / "run"))
    assert t.num_rows == 6 and set(t["status"].to_pylist()) == {"success"}
    assert t["label"].to_pylist() == ["a", "b"] * 3


def test_parquet_missing_column_is_clear(tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "lbl": ["a"]}), tmp_path / "d.parquet")
    r = _recipe({"name": "pq", "kind": "parquet", "domain": "crops", "path": str(tmp_path / "d.parquet")})
    with pytest.raises(sources.SourceError, match=r"no column\(s\) \['label'\].*lbl"):
        ingest.plan(r, RunStore(tmp_path / "run"))


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _recipe({"name": "e", "kind": "imagefolder", "domain": "crops", "path": str(tmp_path / "empty")})
    with pytest.raises(sources.SourceError, match="no images under"):
        ingest.plan(r, RunStore(tmp_path / "run"))
    r = _recipe({"name": "m", "kind": "imagefolder", "domain": "crops", "path": str(tmp_path / "missing")})
    with pytest.raises(sources.SourceError, match="does not exist"):
        ingest.plan(r, RunStore(tmp_path / "run"))


def test_hf_local_dataset_autodetects_columns(tmp_path):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["Tomato___healthy", "Corn_(maize)___Common_rust_"]),
                               "note": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _jpeg((0, i * 30, 0)), "path": None} for i in range(5)],
                                     "label": [0, 1, 0, 1, 1], "note": ["n"] * 5}, features=feats)
    (tmp_path / "hfds" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hfds" / "data" / "train-00000-of-00001.parquet"))
    r = _recipe({"name": "hfl", "kind": "hf", "domain": "crops", "id": str(tmp_path / "hfds"), "split": "train"})
    t = _ingest_all(r, RunStore(tmp_path / "run"))
    assert t["class_name"].to_pylist() == ["tomato healthy", "corn (maize) common rust", "tomato healthy",
                                           "corn (maize) common rust", "corn (maize) common rust"]


def test_hf_hub_id_offline_gives_clear_error(tmp_path):
    r = _recipe({"name": "hub", "kind": "hf", "domain": "crops", "id": "Project-AgML/plant_village_classification"})
    with pytest.raises(sources.SourceError, match="cannot load.*HF_HUB_OFFLINE"):
        ingest.plan(r, RunStore(tmp_path / "run"))


def test_webdataset_source_labels_and_bad_utf8(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s-0000.tar")) as w:
        for i in range(5):
            label = b"\xff\xfe bad" if i == 3 else f"breed_{i % 2}".encode()
            w.write({"__key__": f"k{i:03d}", "jpg": _jpeg((0, 0, i * 50)), "cls": label,
                     "json": json.dumps({"breed": f"B{i}"}).encode()})
    r = _recipe({"name": "w", "kind": "webdataset", "domain": "livestock", "path": str(tmp_path / "s-{0000..0000}.tar")})
    t = _ingest_all(r, RunStore(tmp_path / "run"))
    st = dict(zip(t["orig_id"].to_pylist(), t["status"].to_pylist()))
    assert st["s-0000.tar/k003"] == "failed_to_read" and sum(v == "success" for v in st.values()) == 4
    assert "UTF-8" in t.filter(pa.compute.equal(t["status"], "failed_to_read"))["error"][0].as_py()
    r = _recipe({"name": "w", "kind": "webdataset", "domain": "livestock", "path": str(tmp_path / "s-0000.tar"),
                 "label_key": "json:breed"})
    t = _ingest_all(r, RunStore(tmp_path / "run2"))
    assert t["label"].to_pylist() == [f"B{i}" for i in range(5)]


def test_url_list_through_img2dataset(tmp_path):
    for i in range(3):
        (tmp_path / f"img{i}.jpg").write_bytes(_jpeg((i * 80, 10, 10), size=(80, 60)))
    rows = [f"file://{tmp_path}/img{i}.jpg,class_{i}" for i in range(3)] + [f"file://{tmp_path}/missing.jpg,class_x"]
    (tmp_path / "urls.csv").write_text("url,label\n" + "\n".join(rows) + "\n")
    r = _recipe({"name": "u", "kind": "urls", "domain": "crops", "path": str(tmp_path / "urls.csv"), "processes": 1,
                 "threads": 2})
    t = _ingest_all(r, RunStore(tmp_path / "run"))
    st = dict(zip(t["label"].to_pylist(), t["status"].to_pylist()))
    assert st == {"class_0": "success", "class_1": "success", "class_2": "success", "class_x": "failed_to_download"}


def test_synthetic_is_deterministic_and_class_dependent(tmp_path):
    src = {"name": "s", "kind": "synthetic", "domain": "crops", "classes": ["tomato healthy", "apple scab"], "per_class": 3}
    a = _ingest_all(_recipe(src), RunStore(tmp_path / "a"))
    b = _ingest_all(_recipe(src), RunStore(tmp_path / "b"))
    assert a["image"].to_pylist() == b["image"].to_pylist()
    assert set(a["synthetic"].to_pylist()) == {True}
    means = {}
    for cls, img in zip(a["class_name"].to_pylist(), a["image"].to_pylist()):
        means.setdefault(cls, []).append(np.asarray(Image.open(io.BytesIO(img))).mean(axis=(0, 1)))
    d = np.abs(np.mean(means["tomato healthy"], 0) - np.mean(means["apple scab"], 0)).sum()
    assert d > 10  # classes look different on average
