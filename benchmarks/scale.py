"""Scale: seconds per sample of a whole `alive build` at two sizes (default 5k and 50k samples).

A demo-style recipe (synthetic images in three domains plus captioned general data, an eval source,
template captions, the tiny local CLIP for scoring, near-duplicate search and eval decontamination
on with the default thresholds, mixing, webdataset + HF shards) is built at each size as a whole
`alive build` process, the same way a user runs it. Per sample cost should stay flat: the target is
``per_sample_growth`` (large / small seconds per sample beyond the fixed cost, which a 200-sample
build measures) <= 1.25; the raw ratio is recorded too. Peak RSS is the largest child's ru_maxrss.

Usage: python benchmarks/scale.py [--small 5000] [--large 50000] [--keep DIR]
Raw results go to benchmarks/results/scale.json; the last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"


def recipe(n: int, model: str) -> dict:
    """~n train samples: crops 50%, livestock 20%, fishery 10%, general 20%; a small eval source."""
    def per_class(share: float, classes: int) -> int:
        return max(1, round(n * share / classes))

    crops = [f"crop disease {i}" for i in range(20)]
    return {
        "name": f"scale-{n}", "seed": 0, "image_size": 64,
        "sources": [
            {"name": "leaves", "kind": "synthetic", "domain": "crops", "classes": crops,
             "per_class": per_class(0.5, 20), "size": 96, "licence": "CC0-1.0"},
            {"name": "cattle", "kind": "synthetic", "domain": "livestock", "classes": [f"breed {i}" for i in range(8)],
             "per_class": per_class(0.2, 8), "size": 96, "licence": "CC0-1.0"},
            {"name": "fish", "kind": "synthetic", "domain": "fishery", "classes": [f"species {i}" for i in range(5)],
             "per_class": per_class(0.1, 5), "size": 96, "licence": "CC0-1.0"},
            {"name": "web", "kind": "synthetic", "domain": "general", "captioned": True,
             "classes": [f"thing {i}" for i in range(10)], "per_class": per_class(0.2, 10), "size": 96,
             "licence": "CC0-1.0"},
            {"name": "held", "kind": "synthetic", "domain": "crops", "role": "eval", "classes": crops, "per_class": 5,
             "size": 96, "seed": 11, "licence": "CC0-1.0"},
        ],
        "ingest": {"part_size": 2000, "processes": 2},
        "describe": {"backend": "template"},
        # The default thresholds (near-dup cosine, decontamination) with the tiny model's embeddings.
        "score": {"model": model, "min_score": None},
        "mix": {"shares": {"crops": 0.5, "livestock": 0.2, "fishery": 0.1, "general": 0.2}},
        "write": {"samples_per_shard": 5000, "formats": ["webdataset", "hf"]},
    }


def build(n: int, model: str, work: Path) -> dict:
    """One whole `alive build` process at size n: wall seconds, samples written, the child's peak RSS."""
    rfile = work / f"recipe-{n}.yaml"
    rfile.write_text(yaml.safe_dump(recipe(n, model)))
    out = work / f"run-{n}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    alive = Path(sys.executable).parent / "alive"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([str(alive), "build", "--recipe", str(rfile), "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"alive build failed at n={n}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((out / "summary.json").read_text())
    stages = {k: round(v["seconds"], 2) for k, v in summary["stages"].items()}
    ingested = summary["stages"]["ingest"]["kept"]
    return {"n_requested": n, "ingested": ingested, "samples_written": summary["shards"]["n_samples"],
            "seconds": round(dt, 2), "seconds_per_sample": dt / ingested, "peak_rss_mb": round(max(peak, before) / 1024, 1),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2), "stage_task_seconds": stages}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--large", type=int, default=50000)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    from pipeline.tiny_models import build_tiny_clip

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="alive-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(build_tiny_clip(work / "tiny-clip"))
    # Warm-up at a tiny size: imports, the Prefect server start and the spawn pool are paid by both sizes
    # alike, but the first process on a cold machine also fills the OS file cache.
    base = build(200, model, work)
    small = build(args.small, model, work)
    large = build(args.large, model, work)
    # Seconds per sample beyond the fixed cost (Prefect start-up, imports, pools), which the 200-sample
    # run measures: what grows with the data. The raw ratio is recorded too.
    for r in (small, large):
        r["marginal_seconds_per_sample"] = (r["seconds"] - base["seconds"]) / (r["ingested"] - base["ingested"])
    growth = large["marginal_seconds_per_sample"] / small["marginal_seconds_per_sample"]
    import torch

    raw = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
           "fixed_cost_run": base, "small": small, "large": large, "per_sample_growth": growth,
           "raw_per_sample_growth": large["seconds_per_sample"] / small["seconds_per_sample"], "target_growth": 1.25}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(raw, indent=2) + "\n")
    print(json.dumps({"benchmark": "scale", "ours": round(large["marginal_seconds_per_sample"], 6),
                      "baseline": round(small["marginal_seconds_per_sample"], 6), "unit": "s/sample beyond fixed cost",
                      "speedup": round(1 / growth, 3),
                      "per_sample_growth": round(growth, 3), "seconds": large["seconds"],
                      "peak_rss_mb": large["peak_rss_mb"], "small_n": small["ingested"], "large_n": large["ingested"]}))


if __name__ == "__main__":
    main()
