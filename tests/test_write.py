"""Shard writer: order, repeats spread, keys consistent across tar / sidecar / HF parquet."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shutil

from pipeline import write as writer
from pipeline.executor import run_stages
from runs import parts
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


# ----------------------------------------------------------------------------- downstream tools
IMG2DATASET_SIDECAR = {"url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                       "original_height", "exif", "sha256"}
IMG2DATASET_STATS = {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
                     "end_time", "status_dict"}


class _FilterValid:
    """open_clip's filter_no_caption_or_no_image: keep samples with a caption and an image."""

    def __call__(self, sample: dict) -> bool:
        return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))


def _open_clip_args(card: str) -> tuple[str, int, int, int]:
    """--train-data, --train-num-samples, --workers and --batch-size of the card's open_clip command."""
    import re

    m = re.search(r"--train-data '([^']+)'.*?--train-num-samples (\d+) --workers (\d+) --batch-size (\d+)", card, re.S)
    assert m, "the card has no open_clip command"
    return m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))


def test_shards_read_the_way_open_clip_reads_them(small_run):
    """The card's open_clip command, resolved from the run folder; the pipeline get_wds_dataset builds."""
    import os

    import braceexpand
    import webdataset as wds

    r, store, plan = small_run
    card = store.path("shards", "hf", "README.md").read_text()
    pattern, n_samples, workers, batch = _open_clip_args(card)
    urls = [str(store.root / u) for u in braceexpand.braceexpand(pattern)]
    assert all(os.path.isfile(u) for u in urls) and len(urls) == plan["n_shards"] and workers <= len(urls)
    assert n_samples // batch >= workers  # open_clip: floor(n / batch) batches, at least one per worker
    # open_clip's get_dataset_size: sizes.json beside the (local) shards
    sizes = json.loads((Path(urls[0]).parent / "sizes.json").read_text())
    assert sum(int(sizes[os.path.basename(u)]) for u in urls) == n_samples == plan["n_samples"]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.select(_FilterValid()),
        wds.decode("pilrgb", handler=wds.reraise_exception),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.to_tuple("image", "text"),
        wds.batched(8, partial=True),
    )
    batches = list(pipeline)
    images = [im for b in batches for im in b[0]]
    texts = [t for b in batches for t in b[1]]
    assert len(images) == len(texts) == n_samples
    assert all(im.mode == "RGB" and im.size[0] > 0 for im in images) and all(isinstance(t, str) and t for t in texts)


def test_sidecars_have_img2dataset_columns_with_deterministic_values(small_run):
    r, store, plan = small_run
    wdir = store.path("shards", "wds")
    ingested = pa.concat_tables(pq.read_table(p) for s in ("leaf", "gen") for p in parts(store, "ingest", s))
    orig = {u: (w, h) for u, w, h in zip(ingested["uid"].to_pylist(), ingested["orig_width"].to_pylist(),
                                         ingested["orig_height"].to_pylist())}
    for name in json.loads((wdir / "sizes.json").read_text()):
        side = pq.read_table(wdir / f"{name[:-4]}.parquet")
        assert IMG2DATASET_SIDECAR <= set(side.column_names)
        assert set(side["status"].to_pylist()) == {"success"} and side["error_message"].null_count == side.num_rows
        assert side["url"].null_count == side.num_rows  # synthetic sources have no URL
        for u, w, h in zip(side["uid"].to_pylist(), side["original_width"].to_pylist(),
                           side["original_height"].to_pylist()):
            assert (w, h) == orig[u] and w is not None
        stats = json.loads((wdir / f"{name[:-4]}_stats.json").read_text())
        assert IMG2DATASET_STATS <= set(stats)
        assert (stats["duration"], stats["start_time"], stats["end_time"]) == (0.0, 0.0, 0.0)  # no wall clock in shards
        assert stats["status_dict"] == {"success": stats["count"]}


def test_url_column_comes_from_url_ids():
    from pipeline.write.wds import shard_meta

    rows = pa.table({"key": ["000000000", "000000001"], "uid": ["a", "b"], "repeat": pa.array([0, 0], pa.int32()),
                     "caption": ["x", "y"], "caption_source": ["original"] * 2, "source": ["s"] * 2,
                     "domain": ["general"] * 2, "orig_id": ["https://example.org/a.jpg", "folder/b.jpg"],
                     "orig_width": pa.array([640, None], pa.int32())})
    side = shard_meta(rows)
    assert side["url"].to_pylist() == ["https://example.org/a.jpg", None]
    assert side["original_width"].to_pylist() == [640, None] and side["exif"].null_count == 2


def test_card_parses_with_huggingface_hub(small_run):
    from huggingface_hub import DatasetCard

    from pipeline.write.card import split_sizes

    r, store, plan = small_run
    hf = store.path("shards", "hf")
    card = DatasetCard.load(hf / "README.md")
    d = card.data.to_dict()
    files = sorted((hf / "data").glob("*.parquet"))
    num_bytes, download_size = split_sizes(files)
    assert download_size == sum(p.stat().st_size for p in files)  # what the Hub shows as the download
    info = d["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": num_bytes, "num_examples": 23}]
    assert info["download_size"] == download_size and info["dataset_size"] == num_bytes > download_size // 2
    assert d["size_categories"] == ["n<1K"] and "zero-shot-image-classification" in d["task_categories"]
    # no licence on these sources: `other`, with the name and link the Hub asks for
    assert (d["license"], d["license_name"], d["license_link"]) == ("other", "per-source-licences", "README.md#sources")
    assert d["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert {f["name"]: f["dtype"] for f in info["features"]}["image"] == "image"
    assert "## Sources" in card.text and "## Train with open_clip" in card.text


def test_licence_fields_and_size_categories():
    from pipeline.write.card import licence_fields, size_category

    def rec(*licences):
        return parse_recipe({"name": "l", "sources": [
            {"name": f"s{i}", "kind": "synthetic", "domain": "crops", "classes": ["a"], "licence": lic}
            for i, lic in enumerate(licences)]})

    assert licence_fields(rec("CC-BY-4.0")) == {"license": "cc-by-4.0"}
    assert licence_fields(rec("CC-BY-4.0", "CC0-1.0", "cc-by-4.0")) == {"license": ["cc-by-4.0", "cc0-1.0"]}
    other = licence_fields(rec("CC-BY-4.0", "Custom research terms"))
    assert other["license"] == "other" and other["license_name"] and other["license_link"]
    assert licence_fields(rec("MIT", None))["license"] == "other"
    assert [size_category(n) for n in (0, 999, 1000, 600_000, 13_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "100K<n<1M", "10M<n<100M"]


def test_parquet_files_have_a_page_index_and_content_defined_chunks(small_run):
    from pipeline.store import PARQUET_KW

    r, store, plan = small_run
    assert PARQUET_KW["write_page_index"] is True and PARQUET_KW.get("use_content_defined_chunking") is True
    for p in sorted(store.path("shards", "hf", "data").glob("*.parquet")):
        md = pq.ParquetFile(p).metadata
        cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i) for i in range(md.num_columns)}
        assert all(c.has_offset_index for c in cols.values())
        assert cols["key"].has_column_index and cols["key"].is_stats_set  # metadata columns: min/max per page
        assert not cols["image.bytes"].is_stats_set  # none for the image bytes
