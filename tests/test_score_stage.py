"""Score stage end to end on a tiny run: ingest -> describe (template) -> pair -> score -> finalize.

The run has a synthetic train source, an image-folder train source with planted copies of some of
its images (a byte copy, a re-encoded copy, a resized copy) and an eval source with a planted copy.
The tiny CLIP is untrained: it maps every image to nearly the same direction (distinct images reach
cosine 0.9996 here, copies 0.99999+), so the near-duplicate thresholds below sit between the two.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import ingest, layout, score, selection
from pipeline.executor import run_stages
from pipeline.recipe import parse_recipe
from pipeline.score import embeddings as emb_io
from pipeline.store import RunStore
from pipeline.synthetic import draw_image
from pipeline.tables import EXCLUDED, SCORES

from runs import parts

CLASSES = ["tomato leaf", "corn rust", "healthy wheat"]
TAU = 0.99995


def _raw(i: int) -> bytes:
    """The raw image the synthetic source draws for its i-th sample (class-interleaved)."""
    k, ci = divmod(i, len(CLASSES))
    return draw_image(CLASSES[ci], ci, "crops", k, 0, 96)


def _reencode(data: bytes, quality: int = 70, scale: float = 1.0) -> bytes:
    im = Image.open(io.BytesIO(data))
    if scale != 1.0:
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_recipe(tmp: Path, clip: Path, **score_kw):
    farm, bench = tmp / "farm", tmp / "bench"
    if not farm.exists():
        _write(farm / "cow" / "a_bytecopy.jpg", _raw(0))  # same bytes as plants #0 -> same ingest sha256
        _write(farm / "cow" / "b_reencoded.jpg", _reencode(_raw(1), 70))
        _write(farm / "cow" / "c_resized.jpg", _reencode(_raw(2), 90, 0.8))
        for i in range(3):
            _write(farm / "horse" / f"d{i}.jpg", draw_image("black horse", 1, "livestock", i, 7, 96))
        _write(bench / "tomato" / "planted.jpg", _reencode(_raw(5), 80))
        for i in range(2):
            _write(bench / "fish" / f"e{i}.jpg", draw_image("red snapper", 2, "fishery", i, 3, 96))
    score_cfg = {"model": str(clip), "batch_size": 4, "min_score": None,
                 "dedup": {"exact": True, "near_cosine": TAU}, "decontaminate": True, "decontaminate_cosine": TAU}
    score_cfg.update(score_kw)
    return parse_recipe({
        "name": "score-test", "image_size": 64,
        "sources": [
            {"name": "plants", "kind": "synthetic", "domain": "crops", "classes": CLASSES, "per_class": 4, "size": 96},
            {"name": "farm", "kind": "imagefolder", "domain": "livestock", "path": str(farm)},
            {"name": "bench", "kind": "imagefolder", "domain": "crops", "path": str(bench), "role": "eval"},
        ],
        "ingest": {"part_size": 5},
        "score": score_cfg,
    })


def prepare(recipe, store: RunStore) -> list[tuple[str, int]]:
    """Run every stage before score; returns (source, ingest part) of all sources."""
    run_stages(recipe, store, ["ingest", "describe", "pair"])
    return ingest.ingested_parts(store, recipe)


def score_all(recipe, store: RunStore, units=None) -> dict:
    return run_stages(recipe, store, ["score", "filter"])


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_dir):
    tmp = tmp_path_factory.mktemp("score-run")
    recipe = make_recipe(tmp, tiny_clip_dir)
    store = RunStore(tmp / "run")
    units = prepare(recipe, store)
    score_all(recipe, store, units)
    return tmp, recipe, store, units


def _by_uid(table):
    return {r["uid"]: r for r in table.to_pylist()}


def _ingest_rows(store: RunStore, source: str) -> list[dict]:
    rows = []
    for p in parts(store, "ingest", source):
        rows += pq.read_table(p, columns=["uid", "orig_id", "sha256", "status"]).to_pylist()
    return rows


def test_selection_covers_every_pair_and_only_train(run):
    _, recipe, store, _ = run
    sel = pq.read_table(store.path(layout.SELECTION))
    assert sel.schema.equals(SCORES)
    pairs = [u for s in ("plants", "farm") for p in parts(store, "pair", s) for u in pq.read_table(p)["uid"].to_pylist()]
    assert sorted(sel["uid"].to_pylist()) == sorted(pairs)
    eval_uids = {r["uid"] for r in _ingest_rows(store, "bench")}
    assert not eval_uids & set(sel["uid"].to_pylist())
    assert set(sel["score_model"].to_pylist()) == {recipe.score.model}
    # selection.load (the table every later stage reads) joins it with the ingest metadata.
    joined = selection.load(recipe, store, kept_only=True)
    assert joined.num_rows == sum(sel["keep"].to_pylist()) > 0


def test_planted_copies_are_removed_with_reasons(run):
    _, _, store, _ = run
    sel = _by_uid(pq.read_table(store.path(layout.SELECTION)))
    plants = {r["orig_id"]: r["uid"] for r in _ingest_rows(store, "plants")}
    farm = {r["orig_id"]: r["uid"] for r in _ingest_rows(store, "farm")}
    p = [plants[f"{CLASSES[i % 3]}/{i // 3:06d}"] for i in range(6)]

    # Byte copy: exactly one of the two survives, the other is an exact duplicate of it.
    a, b = sel[p[0]], sel[farm["cow/a_bytecopy.jpg"]]
    assert sorted([a["keep"], b["keep"]]) == [False, True]
    loser = a if not a["keep"] else b
    assert loser["drop_reason"] == "duplicate_exact"
    # Keeper = higher CLIP score.
    assert (a if a["keep"] else b)["clip_score"] >= loser["clip_score"]
    # Re-encoded and resized copies: near duplicates, one kept per pair.
    for orig, copy in ((p[1], "cow/b_reencoded.jpg"), (p[2], "cow/c_resized.jpg")):
        x, y = sel[orig], sel[farm[copy]]
        assert sorted([x["keep"], y["keep"]]) == [False, True], (x, y)
        assert (x if not x["keep"] else y)["drop_reason"] == "duplicate_near"
    # The eval copy removes its train original.
    assert sel[p[5]]["keep"] is False and sel[p[5]]["drop_reason"] == "eval_contamination"
    # Distinct images are all kept.
    for i in (3, 4):
        assert sel[p[i]]["keep"], sel[p[i]]
    for k in range(3):
        assert sel[farm[f"horse/d{k}.jpg"]]["keep"]


def test_excluded_rows_and_summary(run):
    _, _, store, _ = run
    sel = pq.read_table(store.path(layout.SELECTION))
    dropped = {r["uid"]: r["drop_reason"] for r in sel.to_pylist() if not r["keep"]}
    ex = pq.read_table(store.path(layout.excluded("filter", "all")))
    assert ex.schema.equals(EXCLUDED)
    assert {r["uid"]: r["drop_reason"] for r in ex.to_pylist()} == dropped  # no per-row drops in this run
    assert all(r["detail"] for r in ex.to_pylist())
    summary = json.loads(store.path(layout.SCORE_SUMMARY).read_text())
    assert summary["total"] == sel.num_rows and summary["kept"] == sum(sel["keep"].to_pylist())
    assert summary["dropped"] == {"duplicate_exact": 1, "duplicate_near": 2, "eval_contamination": 1}
    assert sum(v["total"] for v in summary["by_source"].values()) == sel.num_rows
    assert set(summary["histograms"]) == {"crops", "livestock"}
    for h in summary["histograms"].values():
        assert sum(h["all"]) == h["pairs"] and sum(h["kept_hist"]) == h["kept"]
    stats = store.read_stats("filter")
    assert stats.total == sel.num_rows and stats.kept == summary["kept"]
    rows = score.summary_rows(summary)
    assert rows[-1]["source"] == "ALL" and rows[-1]["kept"] == summary["kept"]


def test_embeddings_in_clip_retrieval_layout(run):
    _, recipe, store, units = run
    root = store.path("score", "embeddings")
    imgs = sorted((root / "img_emb").glob("img_emb_*.npy"))
    texts = sorted((root / "text_emb").glob("text_emb_*.npy"))
    metas = sorted((root / "metadata").glob("metadata_*.parquet"))
    train_parts = [(s, i) for s, i in units if s != "bench"]
    assert len(imgs) == len(texts) == len(metas) == len(train_parts)
    for fi, ft, fm in zip(imgs, texts, metas):
        assert fi.stem.split("_")[-1] == ft.stem.split("_")[-1] == fm.stem.split("_")[-1]
        a, t, m = np.load(fi), np.load(ft), pq.read_table(fm)
        assert a.dtype == np.float16 and t.dtype == np.float16
        assert a.shape[0] == t.shape[0] == m.num_rows
        np.testing.assert_allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert {"image_path", "caption"} <= set(m.column_names)
        # The stored score is the cosine of the stored embeddings (up to fp16 rounding).
        cos = (a.astype(np.float32) * t.astype(np.float32)).sum(1)
        np.testing.assert_allclose(cos, m["clip_score"].to_numpy(), atol=3e-3)
    # Eval sources get image embeddings only, in their own folder.
    ev = store.path("score", "eval_embeddings")
    assert len(list((ev / "img_emb").glob("*.npy"))) == 1 and not (ev / "text_emb").exists()
    assert score.part_number(recipe, "farm", train_parts[-1][1]) == "00100001"  # source 1, part 1


def test_embeddings_read_the_way_clip_retrieval_indexes_them(run):
    """clip-retrieval's index step (autofaiss over embedding_reader) takes every img_emb_*.npy in name
    order as one matrix and the metadata_*.parquet files in the same order as its rows; `back` maps a hit
    to a metadata row by position. No part may be empty and the rows must line up."""
    _, recipe, store, units = run
    root = store.path("score", "embeddings")
    npys = sorted((root / "img_emb").glob("*.npy"))
    metas = sorted((root / "metadata").glob("*.parquet"))
    assert [p.stem.split("_")[-1] for p in npys] == [p.stem.split("_")[-1] for p in metas]
    shapes = [np.load(p, mmap_mode="r").shape for p in npys]  # embedding_reader reads the npy headers first
    assert all(n > 0 for n, _ in shapes) and len({d for _, d in shapes}) == 1
    emb = np.concatenate([np.load(p) for p in npys])
    meta = pa.concat_tables(pq.read_table(p) for p in metas)
    assert emb.shape[0] == meta.num_rows
    assert meta["key"].to_pylist() == meta["uid"].to_pylist() and meta["key"].null_count == 0
    scores = pa.concat_tables(pq.read_table(store.path(layout.score_part(s, i))) for s, i in units if s != "bench")
    embedded = {u for u, r in zip(scores["uid"].to_pylist(), scores["drop_reason"].to_pylist()) if r != "failed_to_embed"}
    assert set(meta["key"].to_pylist()) == embedded
    # position i of the index is metadata row i: its stored score is the cosine with its own text embedding
    text = np.concatenate([np.load(p) for p in sorted((root / "text_emb").glob("*.npy"))])
    i = meta.num_rows // 2
    cos = float(emb[i].astype(np.float32) @ text[i].astype(np.float32))
    assert abs(cos - meta["clip_score"][i].as_py()) < 3e-3


def test_empty_embedding_part_writes_no_files(tmp_path):
    store = RunStore(tmp_path)
    meta = emb_io.METADATA.empty_table().drop_columns(["key"])
    full = pa.table({"image_path": ["a.jpg"], "caption": ["c"], "uid": ["u1"], "source": ["s"], "domain": ["crops"],
                     "class_name": ["x"], "sha256": ["h"], "clip_score": pa.array([0.3], pa.float32())})
    v = np.ones((1, 8), np.float32) / np.sqrt(8)
    emb_io.write_part(store, "train", "00000007", v, full, v)
    emb_io.write_part(store, "train", "00000007", np.zeros((0, 8), np.float32), meta, np.zeros((0, 8), np.float32))
    p = emb_io.paths(store, "train", "00000007")
    assert not p["img"].exists() and not p["text"].exists() and not p["meta"].exists()  # stale files removed too
    img, m = emb_io.read_part(store, "train", "00000007")
    assert img.shape == (0, 8) and m.num_rows == 0
    emb_io.write_part(store, "train", "00000007", v, full, v)
    assert p["img"].exists() and not p["empty"].exists()
    assert pq.read_table(p["meta"])["key"].to_pylist() == ["u1"]
    p["img"].unlink()
    with pytest.raises(FileNotFoundError, match="img_emb_00000007.npy"):
        emb_io.read_part(store, "train", "00000007")


def test_best_of_k_picks_the_highest_candidate(run, tiny_clip_dir):
    _, recipe, store, _ = run
    enc = score.get_encoder(str(tiny_clip_dir), "auto", "auto", 4)
    part = parts(store, "ingest", "plants")[0]
    rows = pq.read_table(part).to_pylist()
    pairs = pq.read_table(store.path("pair", "plants", part.name)).to_pylist()
    scored = _by_uid(pq.read_table(store.path("score", "plants", part.name)))
    img, _ = enc.encode_images([r["image"] for r in rows])
    for r, e in zip(pairs, img):
        cands = r["candidates"]
        assert len(cands) == 4
        s = enc.encode_texts(cands) @ e
        assert scored[r["uid"]]["caption"] == cands[int(np.argmax(s))]
        assert scored[r["uid"]]["clip_score"] == pytest.approx(float(s.max()), abs=1e-5)
    # Each distinct caption was encoded once across all parts (class templates are shared).
    st = store.read_stats("score")
    n_unique = len({c for s in ("plants", "farm") for p in parts(store, "pair", s)
                    for cs in pq.read_table(p)["candidates"].to_pylist() for c in cs})
    assert 0 < st.counters["texts_encoded"] <= n_unique
    n_cands = sum(len(cs) for s in ("plants", "farm") for p in parts(store, "pair", s)
                  for cs in pq.read_table(p)["candidates"].to_pylist())
    assert st.counters["pairs_scored"] == n_cands and st.counters["images_embedded"] == 18


def test_rerun_skips_and_threshold_change_redecides_without_reembedding(run, tiny_clip_dir):
    tmp, recipe, store, units = run
    sel_before = store.path(layout.SELECTION).read_bytes()
    mtimes = {f: f.stat().st_mtime_ns for f in store.path("score", "embeddings").rglob("*.npy")}
    score_all(recipe, store, units)
    assert store.path(layout.SELECTION).read_bytes() == sel_before
    # A min_score between the scores: parts re-decide from stored scores, embeddings are untouched.
    scores = pq.read_table(store.path(layout.SELECTION))["clip_score"].to_numpy()
    cut = float(np.median(scores))
    r2 = make_recipe(tmp, tiny_clip_dir, min_score=cut)
    score_all(r2, store, units)
    assert {f: f.stat().st_mtime_ns for f in store.path("score", "embeddings").rglob("*.npy")} == mtimes
    sel = pq.read_table(store.path(layout.SELECTION)).to_pylist()
    low = [r for r in sel if r["clip_score"] < cut]
    assert low and all(not r["keep"] and r["drop_reason"] == "low_clip_score" for r in low)
    part_ex = [r for s in ("plants", "farm") for p in parts(store, "ingest", s)
               for r in pq.read_table(store.path(layout.excluded("score", f"{s}/{p.stem}"))).to_pylist()]
    assert {r["uid"] for r in part_ex} == {r["uid"] for r in low}
    # Back to the original settings: the original selection, byte for byte.
    score_all(recipe, store, units)
    assert store.path(layout.SELECTION).read_bytes() == sel_before


def test_top_fraction_per_source(tmp_path, tiny_clip_dir):
    recipe = make_recipe(tmp_path, tiny_clip_dir, top={"fraction": 0.5, "by": "source"},
                         dedup={"exact": False, "near_cosine": None}, decontaminate=False)
    store = RunStore(tmp_path / "run")
    score_all(recipe, store, prepare(recipe, store))
    sel = pq.read_table(store.path(layout.SELECTION)).to_pylist()
    for src, n in (("plants", 12), ("farm", 6)):
        uids = {r["uid"] for r in _ingest_rows(store, src)}
        rows = [r for r in sel if r["uid"] in uids]
        kept = [r for r in rows if r["keep"]]
        assert len(rows) == n and len(kept) == n // 2
        assert min(r["clip_score"] for r in kept) >= max(r["clip_score"] for r in rows if not r["keep"])
        assert {r["drop_reason"] for r in rows if not r["keep"]} == {"below_top_fraction"}


def test_deleted_embedding_reruns_its_part_only(tmp_path, tiny_clip_dir):
    recipe = make_recipe(tmp_path, tiny_clip_dir, dedup={"exact": True, "near_cosine": None})
    store = RunStore(tmp_path / "run")
    prepare(recipe, store)
    score_all(recipe, store)
    sel = store.path(layout.SELECTION).read_bytes()
    n = score.part_number(recipe, "plants", 1)
    store.path(layout.embedding_files("train", n)["img"]).unlink()
    rep = score_all(recipe, store)
    assert [p.name for p in rep["score"].plan.pending] == ["plants/part-00001"]
    assert store.path(layout.SELECTION).read_bytes() == sel  # same bytes again: filter had nothing to redo
    assert not rep["filter"].plan.pending


_CHILD = """
import sys, time
from pathlib import Path
from pipeline.executor import Executor, drive, local_mapper
from pipeline.recipe import Recipe
from pipeline.store import RunStore
recipe = Recipe.model_validate_json(Path(sys.argv[1]).read_text())
ex = Executor(recipe, RunStore(sys.argv[2]))
base = local_mapper(ex)
def slow(stage, kind, items):  # a pause after each unit, so the parent can kill between units
    out = []
    for it in items:
        out += base(stage, kind, [it])
        time.sleep(0.2)
    return out
drive(ex, ["score", "filter"], mapper=slow)
"""


@pytest.mark.slow  # a subprocess importing torch plus two full runs: ~30 s on a busy 2-core machine
def test_resume_after_kill_gives_identical_selection(tmp_path, tiny_clip_dir):
    recipe = make_recipe(tmp_path, tiny_clip_dir, batch_size=2)
    ref = RunStore(tmp_path / "ref")
    score_all(recipe, ref, prepare(recipe, ref))
    store = RunStore(tmp_path / "run")
    units = prepare(recipe, store)
    (tmp_path / "recipe.json").write_text(recipe.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "recipe.json"), str(store.root),
                             ], env=env)
    done = store.path("done", "score")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.exists() and len(list(done.rglob("*.json"))) >= 2:
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the scoring child finished before it could be killed"
    assert not store.path("score", "selection.parquet").exists()
    score_all(recipe, store, units)
    assert store.path("score", "selection.parquet").read_bytes() == ref.path("score", "selection.parquet").read_bytes()
    for f in ref.path("score", "embeddings").rglob("*.npy"):
        rel = f.relative_to(ref.root)
        assert np.array_equal(np.load(f), np.load(store.root / rel)), rel
    assert emb_io.folder(store, "train").exists()


def test_cli_summary(run):
    from typer.testing import CliRunner

    from pipeline.score.cli import app

    _, _, store, _ = run
    res = CliRunner().invoke(app, ["summary", str(store.root)])
    assert res.exit_code == 0, res.output
    assert "duplicate_near" in res.output and "ALL" in res.output
    res = CliRunner().invoke(app, ["summary", str(store.root / "nope")])
    assert res.exit_code == 1 and "run the score stage" in res.output


def test_compiled_encoder_pads_short_batches_and_keeps_scores(tiny_clip_dir, monkeypatch):
    """score.compile: every forward pass gets the full batch shape; the rows kept are the real ones."""
    import torch

    from pipeline.score.encoder import Encoder

    shapes: list[int] = []

    def fake_compile(fn, **kw):  # compiling for real takes tens of seconds; the padding is what is tested
        def run(pixel_values):
            shapes.append(len(pixel_values))
            return fn(pixel_values=pixel_values)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    images = [_raw(i) for i in range(11)]
    eager, _ = Encoder(str(tiny_clip_dir), device="cpu", dtype="fp32", batch_size=4).encode_images(images)
    comp = Encoder(str(tiny_clip_dir), device="cpu", dtype="fp32", batch_size=4, compile=True)
    got, errors = comp.encode_images(images)
    assert errors == [None] * 11 and shapes == [4, 4, 4]
    assert got.shape == eager.shape and np.abs(got - eager).max() < 1e-5
