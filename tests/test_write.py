"""Shard writer: order, repeats spread, keys consistent across tar / sidecar / HF parquet."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shutil

from pipeline import write as writer
from pipeline.executor import run_stages
from pipeline.recipe import parse_recipe
from pipeline.store import RunStore
from pipeline.tables import MANIFEST


def test_expand_spreads_repeats_and_is_deterministic():
    man = pa.table({"uid": [f"u{i:03d}" for i in range(200)], "repeats": np.r_[np.full(190, 1), np.full(10, 3)].astype(np.int32),
                    "bucket": ["crops"] * 200}, schema=MANIFEST)
    a, b = writer.expand(man, 0), writer.expand(man, 0)
    assert a.equals(b) and a.num_rows == 190 + 30
    assert not a.equals(writer.expand(man, 1))
    pos = {}
    for i, u in enumerate(a["uid"].to_pylist()):
        pos.setdefault(u, []).append(i)
    for u in [f"u{i:03d}" for i in range(190, 200)]:
        p = sorted(pos[u])
        assert len(p) == 3 and min(np.diff(p)) > 20  # copies far apart: different shards of 50
    assert sorted(set(a["repeat"].to_pylist())) == [0, 1, 2]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    r = parse_recipe({"name": "w", "seed": 3, "image_size": 64, "sources": [
        {"name": "leaf", "kind": "synthetic", "domain": "crops", "classes": ["tomato healthy", "apple scab"], "per_class": 9},
        {"name": "gen", "kind": "synthetic", "domain": "general", "captioned": True, "classes": ["red car"], "per_class": 5}],
        "ingest": {"part_size": 7}, "score": {"enabled": False}, "mix": {"enabled": False},
        "write": {"samples_per_shard": 10}})
    store = RunStore(root)
    run_stages(r, store, ["ingest", "describe", "pair"])
    writer.write_all(r, store)
    return r, store, writer.load_plan(store)


def test_counts_keys_and_sidecars_agree(small_run):
    import webdataset as wds

    r, store, plan = small_run
    wdir = store.path("shards", "wds")
    sizes = json.loads((wdir / "sizes.json").read_text())
    assert plan["n_samples"] == 23 and plan["n_shards"] == 3 and sum(sizes.values()) == 23
    all_uids = []
    for name, n in sizes.items():
        stem = name[:-4]
        samples = list(wds.WebDataset(str(wdir / name), shardshuffle=False, empty_check=False))
        side = pq.read_table(wdir / f"{stem}.parquet")
        stats = json.loads((wdir / f"{stem}_stats.json").read_text())
        hf = pq.read_table(store.path("shards", "hf", "data", f"train-{stem}-of-{plan['n_shards']:05d}.parquet"))
        keys = [s["__key__"] for s in samples]
        assert keys == side["key"].to_pylist() == hf["key"].to_pylist()
        assert len(keys) == n == stats["count"] == stats["successes"]
        assert all(k.startswith(stem) for k in keys)
        for s in samples:
            meta = json.loads(s["json"])
            assert meta["key"] == s["__key__"] and s["txt"].decode()
            assert s["jpg"][:2] == b"\xff\xd8"
        all_uids += side["uid"].to_pylist()
    assert len(all_uids) == len(set(all_uids)) == 23


def test_original_captions_kept_for_captioned_data(small_run):
    r, store, plan = small_run
    hf = pa.concat_tables(pq.read_table(p) for p in sorted(store.path("shards", "hf", "data").glob("*.parquet")))
    gen = hf.filter(pa.compute.equal(hf["domain"], "general"))
    assert set(gen["caption_source"].to_pylist()) == {"original"} and gen.num_rows == 5
    crops = hf.filter(pa.compute.equal(hf["domain"], "crops"))
    assert set(crops["caption_source"].to_pylist()) == {"template"}
    assert all(c in cap for c, cap in zip(crops["class_name"].to_pylist(), crops["caption"].to_pylist()))


def test_hf_folder_loads_offline_with_image_feature(small_run):
    import datasets

    r, store, plan = small_run
    ds = datasets.load_dataset(str(store.path("shards", "hf")), split="train")
    assert ds.num_rows == 23 and isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].mode == "RGB"
    card = store.path("shards", "hf", "README.md").read_text()
    assert "Synthetic data" in card and "template" in card and r.sha in card


def test_rewrite_is_byte_identical_and_skips(small_run):
    r, store, plan = small_run
    wdir = store.path("shards", "wds")
    before = {p.name: p.read_bytes() for p in wdir.iterdir()}
    again = run_stages(r, store, [writer.PLAN_STAGE, writer.STAGE, writer.INDEX_STAGE])
    assert all(not rep.plan.pending for rep in again.values())  # done: nothing runs
    shutil.rmtree(store.path("done", "write"))  # forget the shard markers: every shard is rewritten
    again = run_stages(r, store, [writer.PLAN_STAGE, writer.STAGE, writer.INDEX_STAGE])
    assert len(again[writer.STAGE].plan.pending) == plan["n_shards"] and not again[writer.INDEX_STAGE].plan.pending
    assert {p.name: p.read_bytes() for p in wdir.iterdir()} == before
    assert not store.path("write", "_spool").exists()
