"""mix_table: exact shares, infeasible targets, class temperature and caps, repeats, determinism."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.mix import MixInfeasibleError, mix_table, table_rows, water_fill
from pipeline.mix.mixer import UNLABELED
from pipeline.recipe import MixConfig
from pipeline.tables import MANIFEST


def pool(spec: list[tuple[str, str, str | None, int]]) -> pa.Table:
    """Rows from (domain, source, class_name or None, count) groups, uids unique."""
    uid, dom, src, cls = [], [], [], []
    for d, s, c, n in spec:
        for i in range(n):
            uid.append(f"{s}-{c}-{i:06d}")
            dom.append(d)
            src.append(s)
            cls.append(c)
    return pa.table({"uid": uid, "domain": dom, "source": src, "class_name": pa.array(cls, pa.string())})


def rows_by(man: pa.Table, col: str = "bucket") -> dict[str, int]:
    out: dict[str, int] = {}
    for b, r in zip(man[col].to_pylist(), man["repeats"].to_pylist()):
        out[b] = out.get(b, 0) + r
    return out


def class_rows(man: pa.Table, table: pa.Table) -> dict[str, int]:
    cls = dict(zip(table["uid"].to_pylist(), table["class_name"].to_pylist()))
    out: dict[str, int] = {}
    for u, r in zip(man["uid"].to_pylist(), man["repeats"].to_pylist()):
        out[cls[u]] = out.get(cls[u], 0) + r
    return out


def manifest_bytes(man: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(man, sink)
    return sink.getvalue().to_pybytes()


BASIC = [("crops", "pv", "a", 300), ("crops", "pv", "b", 100), ("livestock", "cow", "c", 200),
         ("general", "cc", None, 400)]


# ----------------------------------------------------------------------------------------------
# shares
# ----------------------------------------------------------------------------------------------


def test_exact_shares_on_a_small_pool():
    t = pool(BASIC)
    cfg = MixConfig(shares={"crops": 0.5, "livestock": 0.3, "general": 0.2}, total=200)
    man, rep = mix_table(t, cfg, seed=0)
    assert man.schema == MANIFEST
    assert rows_by(man) == {"crops": 100, "livestock": 60, "general": 40}
    assert rep["feasible"] and rep["unmet"] == [] and rep["total"] == 200
    by = {b["bucket"]: b for b in rep["buckets"]}
    assert by["crops"]["realised_share"] == 0.5 and by["livestock"]["target_rows"] == pytest.approx(60)
    assert rep["max_share_error_pt"] == pytest.approx(0.0, abs=1e-12)
    # T = 1 inside crops: classes a:b = 3:1 of 100 rows
    assert class_rows(man, t) == {"a": 75, "b": 25, "c": 60, None: 40}
    assert set(man["repeats"].to_pylist()) == {1}  # no upsampling needed
    # input order is kept: the manifest's uids appear in the pool's order
    pos = {u: i for i, u in enumerate(t["uid"].to_pylist())}
    idx = [pos[u] for u in man["uid"].to_pylist()]
    assert idx == sorted(idx)


def test_largest_remainder_rounding_is_exact_and_stable():
    t = pool([("crops", "a", "x", 100), ("livestock", "b", "y", 100), ("fishery", "c", "z", 100)])
    cfg = MixConfig(shares={"crops": 1 / 3, "livestock": 1 / 3, "fishery": 1 / 3}, total=100)
    man, rep = mix_table(t, cfg, seed=0)
    got = rows_by(man)
    assert sum(got.values()) == 100 and sorted(got.values()) == [33, 33, 34]
    # ties go to the first bucket in name order
    assert got["crops"] == 34
    assert rep["max_share_error_pt"] < 100 / 100  # under one row out of 100


def test_share_error_below_a_hundredth_of_a_point_when_feasible():
    sizes = (2000 / np.arange(1, 301) ** 0.8).astype(int)  # Zipf-skewed class sizes
    spec = [(["crops", "livestock", "fishery"][i % 3], f"s{i % 5}", f"k{i}", int(n)) for i, n in enumerate(sizes)]
    spec.append(("general", "gen", None, 20000))
    t = pool(spec)
    cfg = MixConfig(shares={"crops": 0.45, "livestock": 0.20, "fishery": 0.12, "general": 0.23},
                    class_temperature=2.0, class_cap=500, max_repeats=3)
    man, rep = mix_table(t, cfg, seed=3)
    assert rep["feasible"] and rep["total"] > 10_000
    tot = sum(man["repeats"].to_pylist())
    assert tot == rep["total"]
    for b, n in rows_by(man).items():
        assert abs(n / tot - cfg.shares[b]) * 100 < 0.01
    assert rep["max_share_error_pt"] < 0.01
    # "as large as the caps allow": some bucket is at its capacity with repeats, or one is used once in full
    at_cap = [b for b in rep["buckets"] if b["rows"] == b["capacity"] or b["rows"] == b["capacity_once"]]
    assert at_cap


def test_auto_total_uses_the_richest_bucket_once_and_upsamples_within_repeats():
    t = pool([("crops", "a", "x", 900), ("fishery", "b", "y", 50)])
    cfg = MixConfig(shares={"crops": 0.8, "fishery": 0.2}, max_repeats=3)
    man, rep = mix_table(t, cfg, seed=0)
    # crops alone would allow 900 / 0.8 = 1125, fishery with 3 repeats 150 / 0.2 = 750 -> 750
    assert rep["total"] == 750 and rows_by(man) == {"crops": 600, "fishery": 150}
    assert rep["feasible"]
    cfg1 = MixConfig(shares={"crops": 0.8, "fishery": 0.2}, max_repeats=1)
    _, rep1 = mix_table(t, cfg1, seed=0)
    assert rep1["total"] == 250  # 50 / 0.2: no upsampling allowed
    # no shares: every bucket in proportion to its pool, each sample once
    man2, rep2 = mix_table(t, MixConfig(), seed=0)
    assert rep2["total"] == 950 and rows_by(man2) == {"crops": 900, "fishery": 50}


# ----------------------------------------------------------------------------------------------
# infeasible targets
# ----------------------------------------------------------------------------------------------

SHORT = [("crops", "a", "x", 500), ("fishery", "b", "y", 10), ("general", "g", None, 500)]
SHORT_SHARES = {"crops": 0.5, "fishery": 0.3, "general": 0.2}


def test_infeasible_share_shrinks_the_total_and_says_why():
    t = pool(SHORT)
    man, rep = mix_table(t, MixConfig(shares=SHORT_SHARES, total=100), seed=0)
    assert not rep["feasible"] and rep["applied"] == "same_shares"
    unmet = {u["constraint"]: u for u in rep["unmet"]}
    assert unmet["share"]["bucket"] == "fishery" and unmet["share"]["max_rows"] == 10
    assert "fishery" in unmet["share"]["reason"] and "30.0000%" in unmet["share"]["reason"]
    assert unmet["total"]["target_rows"] == 100 and unmet["total"]["max_rows"] == 33
    # shares kept (to rounding), total shrunk to 10 / 0.3
    assert rep["total"] == 33 and rows_by(man) == {"crops": 16, "fishery": 10, "general": 7}  # 16.5, 9.9, 6.6
    cf = rep["closest_feasible"]
    assert cf["same_shares"]["total"] == 33
    assert cf["same_total"]["total"] == 100 and cf["same_total"]["rows"]["fishery"] == 10
    assert {r["bucket"]: r["status"] for r in table_rows(rep)}["fishery"] == "short"


def test_infeasible_share_keep_total_fills_from_the_others():
    t = pool(SHORT)
    man, rep = mix_table(t, MixConfig(shares=SHORT_SHARES, total=100, on_infeasible="keep_total"), seed=0)
    assert rep["applied"] == "same_total" and rep["total"] == 100
    got = rows_by(man)
    assert got["fishery"] == 10
    # the 20 missing rows go to crops and general in proportion to their shares (5:2)
    assert got["crops"] + got["general"] == 90 and abs(got["crops"] / got["general"] - 2.5) < 0.1
    by = {b["bucket"]: b for b in rep["buckets"]}
    assert by["fishery"]["share_error_pt"] == pytest.approx(-20.0)
    assert [u["bucket"] for u in rep["unmet"] if u["constraint"] == "share"] == ["fishery"]


def test_infeasible_share_error_policy_raises_with_the_report():
    t = pool(SHORT)
    with pytest.raises(MixInfeasibleError) as e:
        mix_table(t, MixConfig(shares=SHORT_SHARES, total=100, on_infeasible="error"), seed=0)
    assert "fishery" in str(e.value)
    assert e.value.report["unmet"][0]["bucket"] == "fishery" and e.value.report["total"] == 0


def test_share_for_a_bucket_without_rows_is_reported():
    t = pool([("crops", "a", "x", 100)])
    man, rep = mix_table(t, MixConfig(general_share=0.25), seed=0)
    assert man.num_rows == 0 and rep["total"] == 0
    u = [x for x in rep["unmet"] if x["constraint"] == "share"][0]
    assert u["bucket"] == "general" and "no samples" in u["reason"]
    # keep_total: the size the other buckets allow (100 / 0.75 = 133) cannot be met either: all of crops
    _, rep2 = mix_table(t, MixConfig(general_share=0.25, on_infeasible="keep_total"), seed=0)
    assert rep2["requested_total"] == 133 and rep2["total"] == 100
    assert {u["constraint"] for u in rep2["unmet"]} == {"share", "total"}


# ----------------------------------------------------------------------------------------------
# class balancing
# ----------------------------------------------------------------------------------------------

SKEWED = [("crops", "a", "big", 1000), ("crops", "a", "mid", 100), ("crops", "a", "small", 10)]


def test_temperature_one_is_proportional():
    t = pool(SKEWED)
    man, _ = mix_table(t, MixConfig(total=111), seed=0)
    assert class_rows(man, t) == {"big": 100, "mid": 10, "small": 1}


def test_temperature_two_follows_sqrt_counts():
    t = pool(SKEWED)
    man, rep = mix_table(t, MixConfig(total=300, class_temperature=2.0), seed=0)
    w = np.sqrt([1000, 100, 10])
    want = 300 * w / w.sum()  # 209.4, 66.2, 20.9 -> 'small' exceeds its 10 samples
    got = class_rows(man, t)
    assert got["small"] == 10  # capped at n * max_repeats
    # the excess is re-spread over the others in proportion to their weights
    lam = (300 - 10) / (w[0] + w[1])
    assert abs(got["big"] - lam * w[0]) < 1 and abs(got["mid"] - lam * w[1]) < 1
    assert sum(got.values()) == 300 and want[2] > 10
    cls = {c["class_name"]: c for c in rep["classes"]}
    assert cls["small"]["target_share_in_bucket"] == pytest.approx(w[2] / w.sum())
    assert cls["big"]["before"] == 1000 and cls["big"]["after"] == got["big"]


def test_high_temperature_with_repeats_flattens_classes():
    t = pool(SKEWED)
    man, _ = mix_table(t, MixConfig(total=300, class_temperature=1000.0, max_repeats=10), seed=0)
    got = class_rows(man, t)
    assert got == {"big": 100, "mid": 100, "small": 100}
    reps = {c: set() for c in got}
    cls = dict(zip(t["uid"].to_pylist(), t["class_name"].to_pylist()))
    for u, r in zip(man["uid"].to_pylist(), man["repeats"].to_pylist()):
        reps[cls[u]].add(r)
    assert reps["small"] == {10} and reps["mid"] == {1} and reps["big"] == {1}


def test_class_cap_metaclip_style():
    t = pool(SKEWED + [("general", "g", None, 30)])
    man, rep = mix_table(t, MixConfig(class_cap=50), seed=0)
    got = class_rows(man, t)
    # keep probability min(1, 50 / n): exactly 50 of big and of mid, all of small; unlabeled rows untouched
    assert got == {"big": 50, "mid": 50, "small": 10, None: 30}
    cls = {c["class_name"]: c for c in rep["classes"]}
    assert cls["big"]["capped"] and cls["mid"]["capped"] and not cls["small"]["capped"]
    assert cls[UNLABELED]["before"] == 30 and not cls[UNLABELED]["labeled"]
    assert {b["bucket"]: b["capped_classes"] for b in rep["buckets"]} == {"crops": 2, "general": 0}


def test_cap_counts_repeats():
    t = pool([("crops", "a", "x", 5), ("crops", "a", "y", 100)])
    man, _ = mix_table(t, MixConfig(class_cap=12, max_repeats=5, class_temperature=100.0, total=24), seed=0)
    got = class_rows(man, t)
    assert got == {"x": 12, "y": 12}  # x: 5 samples x 2-3 copies, never beyond the cap of 12
    assert max(man["repeats"].to_pylist()) == 3


def test_unlabeled_rows_are_singleton_classes():
    t = pool([("general", "g", None, 200), ("general", "h", "labelled", 200)])
    man, rep = mix_table(t, MixConfig(total=200, class_temperature=4.0, class_cap=3), seed=0)
    got = class_rows(man, t)
    # weights: 200 singletons of weight 1 vs one class of weight 200 ** (1/4) ~ 3.8, capped at 3
    assert got["labelled"] == 3 and got[None] == 197
    assert [c["class_name"] for c in rep["classes"] if not c["labeled"]] == [UNLABELED]


def test_selection_inside_a_class_is_seeded_and_spread():
    t = pool([("crops", "a", "x", 10_000)])
    man0, _ = mix_table(t, MixConfig(total=5000), seed=0)
    man1, _ = mix_table(t, MixConfig(total=5000), seed=1)
    pos = {u: i for i, u in enumerate(t["uid"].to_pylist())}
    i0 = np.array([pos[u] for u in man0["uid"].to_pylist()])
    i1 = np.array([pos[u] for u in man1["uid"].to_pylist()])
    assert len(i0) == len(i1) == 5000
    assert 0.47 < i0.mean() / 10_000 < 0.53  # not the first half of the class
    assert np.histogram(i0, bins=10, range=(0, 10_000))[0].min() > 400
    assert 0.4 < len(np.intersect1d(i0, i1)) / 5000 < 0.6  # another seed, another (independent) draw


# ----------------------------------------------------------------------------------------------
# repeats, determinism, input forms
# ----------------------------------------------------------------------------------------------


def test_repeats_are_spread_evenly_and_bounded():
    t = pool([("crops", "a", "x", 400), ("fishery", "b", "y", 7), ("fishery", "b", "z", 13)])
    cfg = MixConfig(shares={"crops": 0.8, "fishery": 0.2}, total=250, max_repeats=4)
    man, rep = mix_table(t, cfg, seed=5)
    assert rows_by(man) == {"crops": 200, "fishery": 50}
    cls = dict(zip(t["uid"].to_pylist(), t["class_name"].to_pylist()))
    per: dict[str, list[int]] = {}
    for u, r in zip(man["uid"].to_pylist(), man["repeats"].to_pylist()):
        per.setdefault(cls[u], []).append(r)
    assert max(max(v) for v in per.values()) <= 4
    for c in ("y", "z"):  # every sample of an upsampled class is in, copies differ by at most one
        assert len(per[c]) == {"y": 7, "z": 13}[c] and max(per[c]) - min(per[c]) <= 1
    assert sum(per["y"]) + sum(per["z"]) == 50
    assert {b["bucket"]: b["max_repeats_used"] for b in rep["buckets"]} == {"crops": 1, "fishery": 3}
    assert min(man["repeats"].to_pylist()) >= 1


def test_same_seed_same_bytes_other_seed_same_counts():
    t = pool(BASIC)
    cfg = MixConfig(shares={"crops": 0.6, "livestock": 0.1, "general": 0.3}, total=500, class_temperature=2,
                    max_repeats=2)
    a, ra = mix_table(t, cfg, seed=7)
    b, rb = mix_table(t, cfg, seed=7)
    c, rc = mix_table(t, cfg, seed=8)
    assert manifest_bytes(a) == manifest_bytes(b) and ra == rb
    assert manifest_bytes(a) != manifest_bytes(c)
    assert rows_by(a) == rows_by(c) and ra["buckets"] == rc["buckets"]


def test_dictionary_and_chunked_input_give_the_same_manifest():
    t = pool(BASIC)
    cfg = MixConfig(shares={"crops": 0.5, "livestock": 0.3, "general": 0.2}, total=300, class_temperature=3)
    plain, _ = mix_table(t, cfg, seed=2)
    dict_cols = t.set_column(1, "domain", pa.compute.dictionary_encode(t["domain"]))
    dict_cols = dict_cols.set_column(3, "class_name", pa.compute.dictionary_encode(t["class_name"]))
    chunked = pa.Table.from_batches(dict_cols.to_batches(max_chunksize=77))
    assert chunked["uid"].num_chunks > 1
    other, _ = mix_table(chunked, cfg, seed=2)
    assert other.combine_chunks().equals(plain.combine_chunks())


def test_general_share_and_splits():
    t = pool([("crops", "a", "x", 1200), ("crops", "b", "y", 400), ("livestock", "c", "z", 400),
              ("general", "g", None, 1000)])
    _, rep = mix_table(t, MixConfig(general_share=0.2, total=1000), seed=0)
    by = {b["bucket"]: b["rows"] for b in rep["buckets"]}
    assert by == {"crops": 640, "livestock": 160, "general": 200}  # .8 split 4:1 by pool
    _, rep = mix_table(t, MixConfig(general_share=0.2, domain_split="equal", total=800), seed=0)
    assert {b["bucket"]: b["rows"] for b in rep["buckets"]} == {"crops": 320, "livestock": 320, "general": 160}
    _, rep = mix_table(t, MixConfig(shares={"crops": 0.5, "livestock": 0.2, "general": 0.3}, source_split="equal",
                                    total=200), seed=0)
    assert {b["bucket"]: b["rows"] for b in rep["buckets"]} == {
        "crops/a": 50, "crops/b": 50, "livestock/c": 40, "general/g": 60}
    _, rep = mix_table(t, MixConfig(shares={"a": 0.5, "b": 0.5}, bucket_by="source", total=200), seed=0)
    by = {b["bucket"]: b for b in rep["buckets"]}
    assert by["a"]["rows"] == 100 and by["b"]["rows"] == 100 and by["g"]["rows"] == 0
    assert rep["not_mixed"] == {"c": 400, "g": 1000}


def test_bad_input_is_named():
    t = pool(BASIC)
    with pytest.raises(ValueError, match="class_name"):
        mix_table(t.drop_columns(["class_name"]), MixConfig(), seed=0)
    bad = t.set_column(0, "uid", pa.array([None] + t["uid"].to_pylist()[1:], pa.string()))
    with pytest.raises(ValueError, match="'uid' is null at row 0"):
        mix_table(bad, MixConfig(), seed=0)


def test_empty_pool():
    t = pool([])
    man, rep = mix_table(t, MixConfig(), seed=0)
    assert man.num_rows == 0 and man.schema == MANIFEST and rep["total"] == 0


def test_config_rules():
    with pytest.raises(ValueError, match="not both"):
        MixConfig(shares={"crops": 1.0}, general_share=0.2)
    with pytest.raises(ValueError, match="sum to 1"):
        MixConfig(shares={"crops": 0.5, "general": 0.3})
    with pytest.raises(ValueError, match="bucket_by: domain"):
        MixConfig(bucket_by="source", source_split="equal")


def test_water_fill():
    w = np.array([5.0, 3.0, 2.0, 0.0])
    cap = np.array([100, 10, 100, 50])
    a = water_fill(w, cap, 60)
    assert a.sum() == 60 and a[1] == 10 and a[3] == 0 and (a <= cap).all()
    assert a[0] / a[2] == pytest.approx(2.5, rel=0.05)
    assert water_fill(w, cap, 10_000).tolist() == [100, 10, 100, 0]
    assert water_fill(np.ones(3), np.array([5, 5, 5]), 7).tolist() == [3, 2, 2]
