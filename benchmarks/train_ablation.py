"""Train-stage ablation: plain CLIP vs DALIP vs CLIP + DINO (and DALIP + DINO) at equal optimizer steps.

Data (not timed): the synthetic run of the train tests — 8 crop classes, 48 training images each,
written as webdataset shards through the write stage's shard writer with template captions; a
held-out eval source of 32 other images per class. Model: the tiny random CLIP (32 px ViT, 2 layers,
width 64) built locally. Every configuration trains from the same initialisation for the same number
of steps with the same batch, learning rate and schedule; only ``train.loss`` / ``train.ssl`` differ.
The extra heads are sized to the tiny model (stated in the output): MBDC keeps DALIP's 128 -> 46
channel ratio (16 -> 6), the DINO head is 128 wide with a 32-d bottleneck and 256 prototypes; all
other DALIP and DINO settings are the recipe defaults (8 local crops, temperatures, momenta).

Metric: zero-shot top-1 on the held-out images, averaged over the template, descriptions and combined
classifiers, then over seeds. ``ours`` = the best of the DALIP / DINO configurations, ``baseline`` =
plain CLIP; ``speedup`` = ours / baseline (accuracy ratio, not time). Per-configuration accuracies,
losses and training seconds are printed and written to benchmarks/results/train_ablation.json.

Usage: python benchmarks/train_ablation.py [--steps 48] [--seeds 3] [--batch 32] [--keep DIR]
The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CLASSES = ["red clover", "white clover", "green gram", "black gram", "yellow mustard", "purple yam",
           "brown mustard", "blue lupin"]
TINY = dict(image_size=32, patch_size=8, hidden=64, layers=2)
DALIP = {"mbdc_dim": 6}
DINO = {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 32}
CONFIGS = {
    "clip": {},
    "dalip": {"loss": "dalip", "dalip": DALIP},
    "clip+dino": {"ssl": "dino", "dino": DINO},
    "dalip+dino": {"loss": "dalip", "dalip": DALIP, "ssl": "dino", "dino": DINO},
}
KINDS = ("template", "descriptions", "both")


def make_recipe(tiny: Path, steps: int, batch: int, seed: int, objective: dict):
    from pipeline.recipe import parse_recipe

    return parse_recipe({
        "name": "train-ablation", "seed": 0, "image_size": 64,
        "sources": [
            {"name": "syn", "kind": "synthetic", "domain": "crops", "classes": CLASSES, "per_class": 48,
             "size": 64, "seed": 0},
            {"name": "syn-heldout", "kind": "synthetic", "domain": "crops", "role": "eval", "classes": CLASSES,
             "per_class": 32, "size": 64, "seed": 1},
        ],
        "ingest": {"part_size": 1000, "processes": 1},
        "train": {"enabled": True, "model": str(tiny), "batch_size": batch, "lr": 2e-3, "max_steps": steps,
                  "epochs": 100, "warmup_steps": max(1, steps // 12), "workers": 2, "log_every": 4,
                  "save_every": 100000, "seed": seed, **objective},
        "eval": {"enabled": True},
    })


def build_data(root: Path, recipe) -> "RunStore":  # noqa: F821
    """Ingest both sources, describe (template backend), pair and write the train shards + sizes.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import describe, ingest, layout, pair
    from pipeline.executor import run_stages
    from pipeline.store import RunStore, write_json_atomic
    from pipeline.write.wds import write_wds_shard

    store = RunStore(root)
    run_stages(recipe, store, ["ingest", "describe"])
    rows = []
    for s_, i in ingest.ingested_parts(store, recipe, role="train"):
        t = pq.read_table(store.path(layout.ingest_part(s_, i)))
        pairs, _, _ = pair.pair_table(t, describe.load_kept(store), 4, recipe.seed, llm=False)
        cap = dict(zip(pairs["uid"].to_pylist(), pairs["candidates"].to_pylist()))
        rows += [{**r, "caption": cap[r["uid"]][0], "caption_source": "template", "repeat": 0, "clip_score": None}
                 for r in t.to_pylist() if r["status"] == "success" and r["uid"] in cap]
    rows.sort(key=lambda r: r["uid"])
    sizes = {}
    for shard, s in enumerate(range(0, len(rows), 100)):
        chunk = [{**r, "key": f"{shard:05d}{i:04d}"} for i, r in enumerate(rows[s:s + 100])]
        write_wds_shard(store, pa.Table.from_pylist(chunk), shard)
        sizes[f"{shard:05d}.tar"] = len(chunk)
    write_json_atomic(store.path("shards", "wds", "sizes.json"), sizes)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    ap.add_argument("--keep", type=Path, default=None, help="Keep the run folders here.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_ablation.json")
    args = ap.parse_args()

    import torch

    from pipeline.store import RunStore
    from pipeline.tiny_models import build_tiny_clip
    from pipeline.train import evaluate, train

    torch.set_num_threads(args.threads)
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="alive-train-ablation-")
        work = Path(tmp.name)
    else:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    prompts = [f"a photo of {c}, a crop disease or crop plant." for c in CLASSES]
    tiny = build_tiny_clip(work / "tiny-clip", seed=0, extra_text=CLASSES + prompts, **TINY)
    t0 = time.perf_counter()
    data = build_data(work / "data", make_recipe(tiny, args.steps, args.batch, 0, {}))
    print(f"data: {sum(json.loads(data.path('shards', 'wds', 'sizes.json').read_text()).values())} train samples, "
          f"{len(CLASSES) * 32} held-out images ({time.perf_counter() - t0:.1f}s, not timed)")

    runs: list[dict] = []
    for seed in range(args.seeds):
        finals = {"base": str(tiny)}
        for name, objective in CONFIGS.items():
            root = work / f"seed{seed}" / name
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(data.path("shards"), root / "shards")
            recipe = make_recipe(tiny, args.steps, args.batch, seed, objective)
            t = time.perf_counter()
            res = train.run(recipe, RunStore(root))
            secs = time.perf_counter() - t
            rows = train.read_metrics(RunStore(root))
            finals[name] = res["final_dir"]
            runs.append({"seed": seed, "config": name, "train_seconds": round(secs, 2), "steps": res["steps"],
                         "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                         "loss_clip_last": rows[-1].get("loss_clip", rows[-1]["loss"]),
                         "metrics_last": rows[-1]})
            print(f"seed {seed} {name:>10}: {res['steps']} steps in {secs:.1f}s, loss {rows[0]['loss']:.3f} -> "
                  f"{rows[-1]['loss']:.3f}")
        ev_store = RunStore(work / f"seed{seed}" / "eval")
        shutil.rmtree(ev_store.root, ignore_errors=True)
        shutil.copytree(data.path("ingest"), ev_store.path("ingest"))
        shutil.copytree(data.path("describe"), ev_store.path("describe"))
        doc = evaluate.run(make_recipe(tiny, args.steps, args.batch, seed, {}), ev_store, finals)
        by = {(r["model"], r["classifier"]): r["top1"] for r in doc["mean"]}
        for r in runs:
            if r["seed"] == seed:
                r["top1"] = {k: by[(r["config"], k)] for k in KINDS}
                r["top1_mean"] = float(np.mean([by[(r["config"], k)] for k in KINDS]))
        if seed == 0:
            print(ev_store.path("eval", "results.md").read_text())
        print(f"seed {seed}: " + ", ".join(f"{r['config']} {r['top1_mean']:.3f}" for r in runs if r["seed"] == seed)
              + f" (base {np.mean([by[('base', k)] for k in KINDS]):.3f}, chance {1 / len(CLASSES):.3f})")

    per: dict[str, dict] = {}
    for name in CONFIGS:
        rs = [r for r in runs if r["config"] == name]
        acc = [r["top1_mean"] for r in rs]
        per[name] = {"top1_mean": round(float(np.mean(acc)), 4), "top1_std": round(float(np.std(acc)), 4),
                     "top1_by_seed": [round(a, 4) for a in acc],
                     "top1_by_classifier": {k: round(float(np.mean([r["top1"][k] for r in rs])), 4) for k in KINDS},
                     "train_seconds_mean": round(float(np.mean([r["train_seconds"] for r in rs])), 2),
                     "loss_clip_last_mean": round(float(np.mean([r["loss_clip_last"] for r in rs])), 4)}
    candidates = {k: v for k, v in per.items() if k != "clip"}
    best = max(candidates, key=lambda k: candidates[k]["top1_mean"])
    summary = {
        "benchmark": "train_ablation",
        "ours": per[best]["top1_mean"],
        "baseline": per["clip"]["top1_mean"],
        "unit": "zero-shot top-1 (held-out, mean of template/descriptions/combined, mean over seeds)",
        "speedup": round(per[best]["top1_mean"] / per["clip"]["top1_mean"], 3),
        "ours_config": best,
        "configs": per,
        "steps": args.steps, "batch": args.batch, "seeds": args.seeds,
        "chance_top1": 1 / len(CLASSES),
        "head_sizes": {"dalip": DALIP, "dino": DINO},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2, sort_keys=True) + "\n")
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
