"""Pairing: deterministic best-of-k caption candidates per image from its class's kept descriptions."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import describe, layout, pair
from pipeline.executor import run_stages
from pipeline.recipe import parse_recipe
from pipeline.stats import StageStats
from pipeline.store import RunStore, write_parquet_atomic
from pipeline.tables import EXCLUDED, INGEST, PAIRS

POOL = {("crops", "apple scab"): [f"An apple scab leaf with olive spots number {i}." for i in range(12)],
        ("fishery", "carp"): ["A carp with bronze scales.", "A carp with barbels."]}


def ingest_rows(n: int = 40) -> pa.Table:
    rows = []
    for i in range(n):
        cls, dom = [("apple scab", "crops"), ("carp", "fishery"), ("unseen weed", "crops")][i % 3]
        rows.append({"uid": f"u{i:04d}", "source": "s", "domain": dom, "role": "train", "label": cls,
                     "class_name": cls, "orig_id": str(i), "image": b"x", "width": 8, "height": 8,
                     "orig_width": 8, "orig_height": 8, "sha256": f"{i:064x}", "caption": None, "licence": None,
                     "synthetic": True, "status": "success", "error": None})
    rows.append({**rows[0], "uid": "u-orig", "class_name": None, "label": None, "domain": "general",
                 "caption": "a dog on a beach"})
    rows.append({**rows[0], "uid": "u-bad", "status": "failed_to_decode", "error": "truncated", "image": None})
    return pa.Table.from_pylist(rows, schema=INGEST)


def test_draw_is_deterministic_distinct_and_spread():
    assert pair.draw(0, "u1", 12, 4) == pair.draw(0, "u1", 12, 4)
    assert pair.draw(0, "u1", 3, 10) and sorted(pair.draw(0, "u1", 3, 10)) == [0, 1, 2]
    assert pair.draw(0, "u1", 0, 4) == []
    for k in (1, 4, 12, 20):
        d = pair.draw(7, "abc", 50, k)
        assert len(d) == len(set(d)) == k and all(0 <= i < 50 for i in d)
    # every index is picked first about equally often over many uids (no modulo/position bias)
    first = Counter(pair.draw(0, f"u{i}", 6, 2)[0] for i in range(6000))
    assert set(first) == set(range(6)) and max(first.values()) < 1.2 * min(first.values())
    # the seed changes the draw
    assert sum(pair.draw(0, f"u{i}", 12, 4) != pair.draw(1, f"u{i}", 12, 4) for i in range(50)) > 40


def test_pair_table_candidates_captions_and_exclusions():
    t = ingest_rows()
    pairs, excluded, stats = pair.pair_table(t, POOL, k=4, seed=3, llm=True)
    assert pairs.schema == PAIRS and excluded.schema == EXCLUDED
    got = {r["uid"]: r for r in pairs.to_pylist()}
    assert "u-bad" not in got  # failed ingest rows are not paired
    assert got["u-orig"]["candidates"] == ["a dog on a beach"] and got["u-orig"]["caption_source"] == "original"
    for i in range(0, 40, 3):
        c = got[f"u{i:04d}"]["candidates"]
        assert len(c) == len(set(c)) == 4 and set(c) <= set(POOL[("crops", "apple scab")])
        assert got[f"u{i:04d}"]["caption_source"] == "llm"
    for i in range(1, 40, 3):  # pool smaller than k: all of it, in a per-image order
        assert sorted(got[f"u{i:04d}"]["candidates"]) == sorted(POOL[("fishery", "carp")])
    ex = excluded.to_pylist()
    assert {r["uid"] for r in ex} == {f"u{i:04d}" for i in range(2, 40, 3)}
    assert {r["drop_reason"] for r in ex} == {"no_description"} and "unseen weed" in ex[0]["detail"]
    assert stats.total == 41 and stats.kept == 41 - len(ex) and stats.dropped["no_description"] == len(ex)
    # images of one class do not all get the same first caption
    firsts = {got[f"u{i:04d}"]["candidates"][0] for i in range(0, 40, 3)}
    assert len(firsts) > 3
    # same inputs -> same output; template descriptions are labelled as such
    again, _, _ = pair.pair_table(t, POOL, k=4, seed=3, llm=True)
    assert again.equals(pairs)
    tpl, _, _ = pair.pair_table(t, POOL, k=4, seed=3, llm=False)
    assert {r["caption_source"] for r in tpl.to_pylist() if r["uid"] != "u-orig"} == {"template"}


def test_run_part_end_to_end_with_template_descriptions(tmp_path):
    r = parse_recipe({"name": "t", "seed": 5, "sources": [{"name": "s", "kind": "synthetic", "domain": "crops",
                                                           "classes": ["apple scab"]}],
                      "describe": {"backend": "template", "captions_per_image": 2}})
    store = RunStore(tmp_path)
    # Hand-made inputs: an ingest part, and descriptions for two of its three classes.
    write_parquet_atomic(store.path(layout.ingest_part("s", 0)), ingest_rows(12))
    classes = [describe.ClassInfo("crops", "apple scab"), describe.ClassInfo("fishery", "carp")]
    write_parquet_atomic(store.path(layout.DESCRIPTIONS),
                         describe.describe_classes(r.describe, store, classes, StageStats("describe")))
    stats = run_stages(r, store, ["pair"])["pair"].stats
    out = pq.read_table(store.path(layout.pair_part("s", 0))).to_pylist()
    assert len(out) == stats.kept == 9 and all(len(x["candidates"]) <= 2 for x in out)
    kept = describe.load_kept(store)
    assert all(set(x["candidates"]) <= set(kept[("crops", "apple scab")]) for x in out if x["uid"] in
               {f"u{i:04d}" for i in range(0, 12, 3)})
    assert pq.read_table(store.path(layout.excluded("pair", "s/part-00000"))).num_rows == 4
    # done: re-running reads the stats back without rewriting
    mtime = store.path(layout.pair_part("s", 0)).stat().st_mtime_ns
    again = run_stages(r, store, ["pair"])["pair"]
    assert again.stats.kept == 9 and not again.plan.pending
    assert store.path(layout.pair_part("s", 0)).stat().st_mtime_ns == mtime


@pytest.mark.parametrize("k", [1, 3])
def test_k_bounds_candidates(k):
    pairs, _, _ = pair.pair_table(ingest_rows(9), POOL, k=k, seed=0, llm=True)
    assert max(len(c) for c in pairs["candidates"].to_pylist()) == k
