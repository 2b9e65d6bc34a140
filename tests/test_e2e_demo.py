"""The offline demo recipe end to end through the Prefect flow; outputs read back with the real readers."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, prefect_harness, tiny_clip_dir):
    from flows.build_alive import build_alive

    out = tmp_path_factory.mktemp("demo")
    result = build_alive(str(ROOT / "recipes" / "demo.yaml"), str(out), {"score.model": str(tiny_clip_dir),
                                                                     "train.model": str(tiny_clip_dir)}, False)
    return out, result


def test_counts_agree_across_readers(demo_run):
    import datasets
    import webdataset as wds

    out, result = demo_run
    wdir = out / "shards" / "wds"
    sizes = json.loads((wdir / "sizes.json").read_text())
    stats_total = sum(json.loads(p.read_text())["count"] for p in wdir.glob("*_stats.json"))
    n_wds = sum(1 for _ in wds.WebDataset(sorted(str(p) for p in wdir.glob("*.tar")), shardshuffle=False))
    ds = datasets.load_dataset(str(out / "shards" / "hf"), split="train")
    assert n_wds == stats_total == sum(sizes.values()) == ds.num_rows == result["samples"] > 0


def test_every_ingested_sample_is_accounted_for(demo_run):
    out, _ = demo_run
    ing = pa.concat_tables(pq.read_table(p, columns=["uid", "role", "status"]) for p in (out / "ingest").glob("*/part-*.parquet"))
    train_ok = set(ing.filter(pa.compute.and_(pa.compute.equal(ing["role"], "train"),
                                              pa.compute.equal(ing["status"], "success")))["uid"].to_pylist())
    sel = pq.read_table(out / "score" / "selection.parquet")
    assert set(sel["uid"].to_pylist()) | set(_excluded(out, "pair")) == train_ok
    dropped = sel.filter(pa.compute.invert(sel["keep"]))
    assert all(dropped["drop_reason"].to_pylist())


def _excluded(out, stage):
    files = list((out / "excluded" / stage).rglob("*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in files)["uid"].to_pylist() if files else []


def test_eval_sources_never_in_shards_and_mix_shares(demo_run):
    out, _ = demo_run
    hf = pa.concat_tables(pq.read_table(p, columns=["source", "domain", "uid"]) for p in (out / "shards" / "hf" / "data").glob("*.parquet"))
    assert "demo-eval-leaves" not in set(hf["source"].to_pylist())
    report = json.loads((out / "mix" / "mix_report.json").read_text())
    assert report  # the mixer explains itself
    shares = Counter(hf["domain"].to_pylist())
    n = hf.num_rows
    target = {"crops": 0.45, "livestock": 0.2, "fishery": 0.12, "general": 0.23}
    for d, t in target.items():
        assert abs(shares[d] / n - t) < 0.02, (d, shares[d] / n)


def test_card_names_models_and_synthetic(demo_run):
    out, result = demo_run
    card = (out / "shards" / "hf" / "README.md").read_text()
    assert "Synthetic data" in card and "Tiny untrained models" in card
    assert "template" in card
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) >= {"ingest", "describe", "pair", "score", "filter", "mix", "write"}
