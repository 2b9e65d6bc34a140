"""Describe-stage overhead vs a bare async client, same requests to the same OpenAI-compatible server.

Production settings on both sides: the prompt sets' sampling (n=10, temperature 0.99, max_tokens
60), concurrency 64, and for ours the CLIP tokenizer that bounds every sentence (a local BPE
tokenizer of the same kind, since nothing is downloaded). Baseline: an httpx.AsyncClient +
semaphore that only posts the stage's exact request bodies and sums ``usage.completion_tokens``.
Ours: the describe stage's work (``pipeline.describe.describe_classes`` + the table write) on a fresh run folder, so every request is a cache miss; its time
includes planning, the SQLite cache writes, post-processing and writing descriptions.parquet.

Two servers (tests/llm_server.py in its own process, scripted answers): ``fast`` answers at once,
so the client is what is measured; ``realistic`` takes --latency seconds per completion, as a
loaded vLLM does. Per server, >= 5 paired rounds that alternate who goes first; overhead per
round = 1 - ours/baseline tokens/s. Target: mean overhead <= 5%, worst round <= 10%.

    python benchmarks/describe_overhead.py [--classes 16] [--rounds 5] [--latency 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from common import finish, load1, load_range, paired_rounds, stats  # noqa: E402
from pipeline import layout  # noqa: E402
from pipeline.describe import ClassInfo, describe_classes  # noqa: E402
from pipeline.stats import StageStats  # noqa: E402
from pipeline.store import write_parquet_atomic  # noqa: E402
from pipeline.describe.llm import OpenAIBackend, _derive_seed  # noqa: E402
from pipeline.recipe import parse_recipe  # noqa: E402
from pipeline.store import RunStore  # noqa: E402

MODEL = "bench-model"
CROPS = ["apple scab", "apple black rot", "cedar apple rust", "corn common rust", "corn northern leaf blight",
         "grape black rot", "grape esca", "potato early blight", "potato late blight", "tomato bacterial spot",
         "tomato leaf mold", "tomato mosaic virus"]
LIVESTOCK = ["holstein cattle", "angus cattle", "jersey cattle", "merino sheep", "boer goat", "duroc pig"]
FISHERY = ["nile tilapia", "common carp", "atlantic salmon", "rainbow trout", "european eel", "sea bass"]


def classes(n: int) -> list[ClassInfo]:
    pool = [ClassInfo("crops", c, "plant leaf") for c in CROPS] + [ClassInfo("livestock", c) for c in LIVESTOCK] \
        + [ClassInfo("fishery", c) for c in FISHERY]
    out = [pool[i % len(pool)] for i in range(n)]
    return [ClassInfo(c.domain, c.class_name + ("" if i < len(pool) else f" {i // len(pool)}"), c.context)
            for i, c in enumerate(out)]


def start_server(latency: float, names: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "tests" / "llm_server.py"), "--mode", "scripted", "--model-name", MODEL,
           "--delay", str(latency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the benchmark server did not start")
    return proc, json.loads(line)["base_url"]


async def bare_client(base_url: str, bodies: list[dict], concurrency: int, timeout: float) -> dict:
    """The baseline: post every body with at most ``concurrency`` in flight; nothing else.

    Like the stage it first asks GET /v1/models: with one connection already open, httpx's pool
    ramps up faster than when 64 connects race, and the baseline should be the strongest bare client.
    """
    sem = asyncio.Semaphore(concurrency)
    tokens = {"out": 0, "in": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", limits=limits,
                                 timeout=httpx.Timeout(timeout)) as client:
        async def one(body: dict) -> None:
            async with sem:
                r = await client.post("chat/completions", json=body)
                r.raise_for_status()
                u = r.json()["usage"]
                tokens["out"] += u["completion_tokens"]
                tokens["in"] += u["prompt_tokens"]

        t0 = time.perf_counter()
        (await client.get("models")).raise_for_status()
        await asyncio.gather(*(one(b) for b in bodies))
        dt = time.perf_counter() - t0
    return {"tokens_out": tokens["out"], "seconds": dt, "tokens_per_s": tokens["out"] / dt}


def bench_server(name: str, latency: float, args, cls: list[ClassInfo], tokenizer: Path, work: Path) -> dict:
    proc, base_url = start_server(latency, [c.class_name for c in cls])
    try:
        spec = {"name": "bench", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops", "classes": ["a"]}],
                "describe": {"backend": "openai", "base_url": base_url, "model": MODEL,
                             "concurrency": args.concurrency, "clip_tokenizer": str(tokenizer)}}
        recipe = parse_recipe(spec)
        backend = OpenAIBackend(recipe.describe, RunStore(work / f"plan-{name}"))
        assert backend.count_tokens.kind.startswith("tokenizer:"), backend.count_tokens.kind
        items = backend.plan(cls)
        n = items[0].pset.sampling["n"]
        bodies = [backend.payload(it, n, _derive_seed(backend.sampling(it.pset)["seed"], it.label, 0)) for it in items]
        k = [0]

        def ours() -> dict:
            store = RunStore(work / f"run-{name}-{k[0]}")
            k[0] += 1
            t0 = time.perf_counter()
            st = StageStats("describe")  # the describe stage's work: describe, post-process, write the table
            write_parquet_atomic(store.path(layout.DESCRIPTIONS), describe_classes(recipe.describe, store, cls, st))
            dt = time.perf_counter() - t0
            assert st.counters["cache_hits"] == 0 and st.counters["requests"] == len(bodies), st.counters
            out = st.counters["tokens_out"]
            return {"seconds": dt, "tokens_out": out, "tokens_per_s": out / dt}

        def base() -> dict:
            return asyncio.run(bare_client(base_url, bodies, args.concurrency, 300))

        if not args.no_warmup:
            ours(), base()  # warm-up: imports, tokenizer, connection setup, the server's first requests
        rounds = paired_rounds(args.rounds, {"ours": ours, "bare_client": base}, lambda r, rec: print(
            f"{name} round {r}: bare {rec['bare_client']['tokens_per_s']:.0f} tok/s "
            f"({rec['bare_client']['seconds']:.2f}s)  ours {rec['ours']['tokens_per_s']:.0f} tok/s "
            f"({rec['ours']['seconds']:.2f}s)  load {load1()}",
            flush=True))
    finally:
        proc.terminate()
        proc.wait(10)
    for r in rounds:
        assert r["ours"]["tokens_out"] == r["bare_client"]["tokens_out"], "both sides must get the same answers"
        r["overhead"] = 1 - r["ours"]["tokens_per_s"] / r["bare_client"]["tokens_per_s"]
    ov = stats([r["overhead"] for r in rounds], higher_is_better=False)
    return {"latency_s": latency, "requests": len(bodies), "n": n,
            "ours_tokens_per_s": stats([r["ours"]["tokens_per_s"] for r in rounds])["median"],
            "bare_tokens_per_s": stats([r["bare_client"]["tokens_per_s"] for r in rounds])["median"],
            "overhead_mean": ov["mean"], "overhead_median": ov["median"], "overhead_worst": ov["worst"],
            "load": load_range(rounds, ("ours", "bare_client")),
            "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency", type=float, default=1.5, help="seconds per completion of the realistic server")
    ap.add_argument("--servers", default="fast,realistic")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pipeline.tiny_models import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="alive-describe-bench-"))
    tok = work / "clip-tokenizer"
    build_tokenizer(tok)
    cls = classes(args.classes)
    res = {}
    for name in args.servers.split(","):
        res[name] = bench_server(name, 0.0 if name == "fast" else args.latency, args, cls, tok, work)
    head = res.get("fast") or next(iter(res.values()))
    rounds = {k: v.pop("rounds") for k, v in res.items()}
    for k, v in res.items():
        print(f"{k} server (latency {v['latency_s']}s): bare {v['bare_tokens_per_s']:.0f} tok/s, ours "
              f"{v['ours_tokens_per_s']:.0f} tok/s; overhead mean {100 * v['overhead_mean']:.1f}%, median "
              f"{100 * v['overhead_median']:.1f}%, worst {100 * v['overhead_worst']:.1f}%")
    met = all(v["overhead_mean"] <= 0.05 and v["overhead_worst"] <= 0.10 for v in res.values())
    summary = {"ours": round(head["ours_tokens_per_s"], 1), "baseline": round(head["bare_tokens_per_s"], 1),
               "unit": "tokens/s", "speedup": round(1 - head["overhead_median"], 4),
               "overhead_mean": head["overhead_mean"], "overhead_median": head["overhead_median"],
               "overhead_worst": head["overhead_worst"], "rounds": args.rounds, "servers": res,
               "requests": head["requests"], "n": head["n"], "concurrency": args.concurrency,
               "clip_tokenizer": True, "target": {"overhead_mean": 0.05, "overhead_worst": 0.10}, "met": met}
    finish("describe_overhead", summary, [], vars(args), ["httpx", "aiohttp", "tokenizers", "transformers", "pyarrow"],
           args.results, {"rounds_by_server": rounds})


if __name__ == "__main__":
    main()
