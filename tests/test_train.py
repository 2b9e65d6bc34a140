"""Train/eval stage end to end on synthetic data: a tiny CLIP trained from scratch must learn.

One session-scoped run (ingest -> describe -> pair -> write-stage shards -> train) is shared by the
tests here; 96 optimizer steps of batch 32 on 384 images of 8 classes (32 px ViT, 2 layers).
Measured on the dev box (2 shared CPU cores, 7-17 s of training): contrastive loss 3.6-3.7 -> 1.46-1.59
(chance is ln 32 = 3.47; about 1.4 is the floor when 8 classes share 4 template captions in a batch);
zero-shot top-1 on 256 held-out images 0.98-1.00 for every classifier (chance 0.125, the random init
0.125); with the score stage's threshold filter (threshold fitted on half the pairs, about 0.6),
precision and recall 1.00 at removing 30% mismatched captions on the other half (5 of 5 draws).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import describe, ingest, layout, pair
from pipeline.executor import run_stages
from pipeline.recipe import Recipe, parse_recipe
from pipeline.store import RunStore, write_json_atomic

# Colour words give a class its body colour (pipeline.synthetic.class_style): eight distinct looks.
CLASSES = ["red clover", "white clover", "green gram", "black gram", "yellow mustard", "purple yam",
           "brown mustard", "blue lupin"]
TRAIN_PER_CLASS = 48
HELDOUT_PER_CLASS = 32
TINY = dict(image_size=32, patch_size=8, hidden=64, layers=2)
FAST_TRAIN = dict(batch_size=32, lr=2e-3, epochs=8, warmup_steps=8, workers=2, log_every=4, save_every=1000,
                  augment=True)


def make_recipe(tiny_dir: Path, **train) -> Recipe:
    return parse_recipe({
        "name": "train-test", "seed": 0, "image_size": 64,
        "sources": [
            {"name": "syn", "kind": "synthetic", "domain": "crops", "classes": CLASSES,
             "per_class": TRAIN_PER_CLASS, "size": 64, "seed": 0},
            # Held out by construction: another seed draws other images of the same classes.
            {"name": "syn-heldout", "kind": "synthetic", "domain": "crops", "role": "eval", "classes": CLASSES,
             "per_class": HELDOUT_PER_CLASS, "size": 64, "seed": 1},
        ],
        "ingest": {"part_size": 1000, "processes": 1},
        "train": {"enabled": True, "model": str(tiny_dir), **{**FAST_TRAIN, **train}},
        "eval": {"enabled": True},
    })


def write_shards(recipe: Recipe, store: RunStore, per_shard: int = 100) -> dict[str, int]:
    """Shards through the write stage's own shard writer (NNNNN.tar of {key}.jpg/.txt/.json) + sizes.json."""
    import pyarrow as pa

    from pipeline.write.wds import write_wds_shard

    rows = []
    for source, i in ingest.ingested_parts(store, recipe, role="train"):
        t = pq.read_table(store.path(layout.ingest_part(source, i)))
        pairs, _, _ = pair.pair_table(t, describe.load_kept(store), 4, recipe.seed, llm=False)
        cap = dict(zip(pairs["uid"].to_pylist(), pairs["candidates"].to_pylist()))
        rows += [{**r, "caption": cap[r["uid"]][0], "caption_source": "template", "repeat": 0, "clip_score": None}
                 for r in t.to_pylist() if r["status"] == "success" and r["uid"] in cap]
    rows.sort(key=lambda r: r["uid"])
    sizes = {}
    for shard, s in enumerate(range(0, len(rows), per_shard)):
        chunk = [{**r, "key": f"{shard:05d}{i:04d}"} for i, r in enumerate(rows[s:s + per_shard])]
        write_wds_shard(store, pa.Table.from_pylist(chunk), shard)
        sizes[f"{shard:05d}.tar"] = len(chunk)
    write_json_atomic(store.path("shards", "wds", "sizes.json"), sizes)
    return sizes


def build_run(root: Path, recipe: Recipe) -> RunStore:
    """Ingest every source, describe its classes (template backend) and write the train shards."""
    store = RunStore(root)
    run_stages(recipe, store, ["ingest", "describe"])
    write_shards(recipe, store)
    return store


def tiny_clip(root: Path) -> Path:
    from pipeline.tiny_models import build_tiny_clip

    prompts = [f"a photo of {c}, a crop disease or crop plant." for c in CLASSES]
    return build_tiny_clip(root / "tiny-clip", seed=0, extra_text=CLASSES + prompts, **TINY)


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU spinning OpenMP
    threads slow them several-fold; restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(recipe, store, train summary) of one tiny CLIP trained from scratch on the synthetic shards."""
    from pipeline.train import train

    root = tmp_path_factory.mktemp("train-run")
    recipe = make_recipe(tiny_clip(root))
    store = build_run(root / "run", recipe)
    with one_torch_thread():
        summary = train.run(recipe, store)
    return recipe, store, summary


# ----------------------------------------------------------------------------- learning


def test_loss_falls_by_a_clear_margin(trained):
    from pipeline.train.train import read_metrics

    recipe, store, summary = trained
    rows = read_metrics(store)
    assert summary["steps"] == summary["plan"]["total_steps"] == rows[-1]["step"]
    assert summary["samples_trained"] == summary["steps"] * recipe.train.batch_size
    first, last = rows[0]["loss"], rows[-1]["loss"]
    # Chance is ln(32) = 3.47; the floor with 8 classes x 4 template captions per batch is about 1.4.
    assert first > 3.0, rows[:3]
    assert last < 0.6 * first, (first, last)
    lrs = [r["lr"] for r in rows]
    assert max(lrs) == pytest.approx(recipe.train.lr, rel=0.05) and lrs[-1] < 0.05 * recipe.train.lr  # cosine to 0
    final = Path(summary["final_dir"])
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (final / f).is_file(), f
    assert not store.path("train", "checkpoints").exists()  # superseded by the final model
    stats = store.read_stats("train")
    assert stats.total == stats.kept and stats.counters["samples_trained"] == summary["samples_trained"]


def test_zero_shot_beats_chance_on_heldout(trained):
    from pipeline.train import evaluate

    recipe, store, _ = trained
    res = evaluate.run(recipe, store)
    assert set(res["models"]) == {"base", "finetuned"}
    by = {(r["model"], r["classifier"]): r for r in res["results"]}
    n = len(CLASSES) * HELDOUT_PER_CLASS
    for kind in ("template", "descriptions", "both"):
        ft, base = by[("finetuned", kind)], by[("base", kind)]
        assert ft["n_images"] == n and ft["n_classes"] == len(CLASSES)
        # chance is 1/8 = 0.125; measured ~0.95 fine-tuned vs ~0.1 for the random init
        assert ft["top1"] >= 0.6, (kind, ft)
        assert ft["top1"] > base["top1"] + 0.3, (kind, ft, base)
        assert ft["top5"] >= ft["top1"]
    assert res["description_backend"] == "template" and "baseline" in res["description_note"]
    md = store.path("eval", "results.md").read_text()
    assert "fine-tuned top-1" in md and "syn-heldout" in md and "**mean**" in md
    assert store.path("eval", "zero_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(store.path("eval", "results.json").read_text())
    assert doc["rows"] == res["rows"] and len(res["rows"]) == 2 * 3  # (task + mean) x classifiers
    again = evaluate.run(recipe, store)
    assert again["skipped"] and again["results"] == res["results"]


def test_threshold_filter_removes_mismatched_captions(trained):
    """30% of pairs get another class's caption; the score stage's cosine + threshold filter finds them.

    The threshold is fitted on one half of the pairs and applied to the other half.
    """
    from pipeline.score.encoder import Encoder
    from pipeline.score.filters import LOW_SCORE, row_filters
    from pipeline.train.evaluate import load_task, template_sentences

    recipe, store, summary = trained
    task = load_task(recipe, store, "syn-heldout")
    templates = {"crops": [t for t in _templates(recipe)]}
    rng = random.Random(0)
    n = len(task.images)
    bad = np.zeros(n, bool)
    bad[rng.sample(range(n), int(0.3 * n))] = True
    captions = []
    for i in range(n):
        true = task.labels[i]
        cls = rng.choice([c for c in range(len(CLASSES)) if c != true]) if bad[i] else true
        captions.append(rng.choice(template_sentences(templates, "crops", task.classes[cls])))
    enc = Encoder(summary["final_dir"], device="cpu", dtype="fp32", batch_size=64)
    img, errors = enc.encode_images(task.images)
    assert not any(errors)
    score = np.sum(img * enc.encode_texts(captions), axis=1)
    half = np.arange(n) % 2 == 0
    threshold = _best_threshold(score[half], bad[half])
    side = np.full(n, 64)
    reasons = row_filters(side[~half], side[~half], score[~half], None, None, threshold)
    removed = np.array([r == LOW_SCORE for r in reasons])
    truth = bad[~half]
    precision = (removed & truth).sum() / max(1, removed.sum())
    recall = (removed & truth).sum() / truth.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, threshold)


def _templates(recipe: Recipe) -> list[str]:
    from pipeline.train.evaluate import load_templates

    return load_templates(recipe)[0]["crops"]


def _best_threshold(score: np.ndarray, bad: np.ndarray) -> float:
    """The cut that best separates mismatched (low) from matched pairs; the middle of the best plateau."""
    s = np.sort(score)
    cuts = (s[1:] + s[:-1]) / 2
    acc = np.array([((score < c) == bad).mean() for c in cuts])
    best = np.flatnonzero(acc == acc.max())
    return float((cuts[best[0]] + cuts[best[-1]]) / 2)


# ----------------------------------------------------------------------------- mechanics


def _fork_run(trained, tmp_path: Path, **train_overrides) -> tuple[Recipe, RunStore]:
    """A fresh run folder with the session run's shards (and tiny model) and other train settings."""
    recipe, store, _ = trained
    root = tmp_path / "run"
    shutil.copytree(store.path("shards"), root / "shards")
    r = make_recipe(Path(recipe.train.model), **train_overrides)
    return r, RunStore(root)


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


SHORT = dict(batch_size=16, max_steps=7, save_every=3, log_every=1, warmup_steps=2)


def test_resume_after_a_crash_matches_an_uninterrupted_run(trained, tmp_path, monkeypatch):
    from pipeline.train import train

    straight_recipe, straight = _fork_run(trained, tmp_path / "a", **SHORT)
    ref = train.run(straight_recipe, straight)
    assert ref["steps"] == 7 and ref["resumed_from"] is None

    recipe, store = _fork_run(trained, tmp_path / "b", **SHORT)
    real_step, calls = train.train_step, {"n": 0}

    def crashing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-3 checkpoint, mid-way to step 6
            raise KeyboardInterrupt("simulated kill")
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(recipe, store)
    ckpts = sorted(p.name for p in store.path("train", "checkpoints").iterdir())
    assert ckpts == ["step-0000003"]
    assert train.latest_checkpoint(store, "another-config") is None  # other settings never resume from it
    monkeypatch.setattr(train, "train_step", real_step)
    res = train.run(recipe, store)
    assert res["resumed_from"] == 3 and res["steps"] == 7
    steps = [r["step"] for r in train.read_metrics(store)]
    assert steps == list(range(1, 8))  # lines past the checkpoint were rewritten, none doubled
    a, b = _weights(Path(ref["final_dir"])), _weights(Path(res["final_dir"]))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert store.read_stats("train").counters["samples_trained"] == 7 * 16
    assert train.run(recipe, store)["skipped"]  # done: a re-run does nothing


def test_grad_accumulation_equals_one_big_batch(trained):
    """Two micro-batches of 8 give the gradient of one contrastive batch of 16 (the feature cache)."""
    import torch

    from pipeline.train.model import load_clip, tokenize
    from pipeline.train.train import train_step

    recipe, _, _ = trained
    loaded = load_clip(recipe.train.model)
    model = loaded.model
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(16, 3, loaded.spec.size, loaded.spec.size, generator=g)
    caps = [f"a photo of {CLASSES[i % 8]}, number {i}" for i in range(16)]
    enc = tokenize(loaded.tokenizer, caps, model)

    def grads(micro):
        model.zero_grad()
        loss = train_step(model, micro, torch.device("cpu"), None, None)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big = {"pixel_values": pix, **enc}
    halves = [{k: v[s] for k, v in big.items()} for s in (slice(0, 8), slice(8, 16))]
    loss1, g1 = grads([big])
    loss2, g2 = grads(halves)
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert g1.keys() == g2.keys() and "logit_scale" in g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)
    # ...while summing two independent halves' losses would not
    model.zero_grad()
    naive = sum(train_step(model, [h], torch.device("cpu"), None, None) for h in halves) / 2
    assert abs(naive - loss1) > 1e-3


def test_frozen_vision_tower_stays_fixed_and_bad_samples_are_skipped(trained, tmp_path):
    import io
    import tarfile

    from pipeline.train import train

    # bf16 autocast on CPU: the optional mixed-precision path that runs without a GPU.
    recipe, store = _fork_run(trained, tmp_path, batch_size=8, max_steps=3, freeze="vision", grad_accum=2,
                              precision="bf16")
    wds_dir = store.path("shards", "wds")
    sizes = json.loads((wds_dir / "sizes.json").read_text())
    # A shard with a corrupt image and one that is not a tar at all: counted, never fatal.
    with tarfile.open(wds_dir / "99998.tar", "w") as tf:
        for name, data in [("bad0.jpg", b"not a jpeg"), ("bad0.txt", b"a photo of maize")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (wds_dir / "99999.tar").write_bytes(b"garbage" * 100)
    sizes.update({"99998.tar": 1, "99999.tar": 1})
    write_json_atomic(wds_dir / "sizes.json", sizes)

    res = train.run(recipe, store)
    assert res["steps"] == 3 and res["freeze"] == "vision" and res["precision"] == "torch.bfloat16"
    assert all(np.isfinite(r["loss"]) for r in train.read_metrics(store))
    before, after = _weights(Path(recipe.train.model)), _weights(Path(res["final_dir"]))
    vision = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in before if k.startswith(("text_model.", "text_projection."))]
    assert vision and text
    assert all(np.array_equal(before[k], after[k]) for k in vision)
    assert sum(not np.array_equal(before[k], after[k]) for k in text) > len(text) // 2
    stats = store.read_stats("train")
    # 3 steps x 2 micro-batches x 8, less a corrupt image if the shuffle put it in one of them.
    assert stats.counters["samples_trained"] in (47, 48) and stats.kept == stats.counters["samples_trained"]
    assert stats.total == stats.kept + stats.n_dropped
    assert res["trainable_params"] < sum(v.size for v in before.values())


def test_bad_samples_are_counted_not_fatal(tmp_path):
    """A full epoch over a shard set with broken members: every bad one is counted with its reason."""
    import io
    import tarfile

    from pipeline.synthetic import draw_image
    from pipeline.train import data as D
    from pipeline.stats import StageStats

    good = draw_image("maize", 0, "crops", 0, 0, 64)
    members = [("a.jpg", good), ("a.txt", b"a photo of maize"), ("b.jpg", b"not a jpeg"), ("b.txt", b"x"),
               ("c.jpg", good), ("d.txt", b"caption without image"), ("e.jpg", good), ("e.txt", b"  ")]
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "00001.tar").write_bytes(b"garbage" * 100)
    stats = StageStats("train")
    raw = list(D.raw_stream(tmp_path, ["00000.tar", "00001.tar"], 0, 0, stats, 10))
    spec = D.ImageSpec(32)
    pix, caps = D.preprocess_batch(raw, spec, 0, 0, stats, D.RateLimitedLog(D.log), None, augment=True)
    assert caps == ["a photo of maize"] and pix.shape == (1, 3, 32, 32)
    assert dict(stats.dropped) == {"missing_caption": 1, "missing_image": 1, "empty_caption": 1,
                                   "failed_to_decode": 1, "unreadable_shard": 1}
    assert stats.total == 5 and stats.kept == 1


def test_plan_and_schedule():
    from pipeline.recipe import TrainConfig
    from pipeline.train.train import make_plan

    p = make_plan(TrainConfig(batch_size=64, grad_accum=4, epochs=2), 10_000)
    assert p.steps_per_epoch == 39 and p.total_steps == 78 and p.warmup_steps == 4
    assert p.lr == pytest.approx(1e-3 * 256 / 128)  # AgriCLIP's 1e-3 at batch 128, scaled linearly
    lrs = [p.lr_at(s) for s in range(p.total_steps)]
    assert lrs[3] == pytest.approx(p.lr) and lrs[0] == pytest.approx(p.lr / 4)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.01 * p.lr
    assert make_plan(TrainConfig(batch_size=8, max_steps=5, lr=1e-4), 1000).total_steps == 5
    with pytest.raises(ValueError, match="lower train.batch_size"):
        make_plan(TrainConfig(batch_size=128), 100)


def test_missing_shards_is_a_clear_error(trained, tmp_path):
    from pipeline.train import train

    recipe, _, _ = trained
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        train.run(recipe, RunStore(tmp_path))


def test_from_config_trains_a_fresh_init_and_keeps_it_as_the_eval_base(trained, tmp_path):
    from pipeline.train import evaluate, train

    tiny = Path(trained[0].train.model)
    cfg = json.loads((tiny / "config.json").read_text())
    from_config = {k: cfg[k] for k in ("text_config", "vision_config", "projection_dim")}
    recipe, store = _fork_run(trained, tmp_path, from_config=from_config, max_steps=2, batch_size=8, seed=5)
    res = train.run(recipe, store)
    assert res["from_config"] and res["steps"] == 2
    assert evaluate.default_models(recipe, store) == {"base": str(store.path("train", "base")),
                                                      "finetuned": res["final_dir"]}
    base, init = _weights(store.path("train", "base")), _weights(tiny)
    assert base.keys() == init.keys()
    assert any(not np.array_equal(base[k], init[k]) for k in base)  # seed 5, not the tiny model's weights
    final = _weights(Path(res["final_dir"]))
    assert any(not np.array_equal(base[k], final[k]) for k in base)  # and training moved away from it
