"""Mixer at PlantMix scale: 13M pool rows, ours vs the same spec written in polars and in pandas.

Input (generation not timed): 3 domains with 2000 Zipf-skewed classes over 10 sources, plus an
unlabeled general pool, written once to a parquet file. Each implementation then runs in a fresh
subprocess that reads the file (not timed), mixes (timed) and reports its peak RSS (ru_maxrss of the
child, input included). Spec: shares crops .45 / livestock .20 / fishery .12 / general .23, class
temperature 2, class cap 20000, max repeats 3, total "as large as the caps allow".

Baselines: polars (group_by sizes, a join back, a seeded rank over each group, one lazy plan) and
pandas with category codes (one group id per row from the codes, one groupby cumcount). The few
thousand per-group allocations are computed by the same numpy function for both; the time is in the
per-row work. Sides alternate in paired rounds (fresh process each), after one warm-up each.

Usage: python benchmarks/mix_scale.py [--rows 13000000] [--rounds 5] [--keep DIR]
The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import finish, load1, load_range, paired_rounds, stats  # noqa: E402

SHARES = {"crops": 0.45, "livestock": 0.20, "fishery": 0.12, "general": 0.23}
SPEC = dict(shares=SHARES, class_temperature=2.0, class_cap=20000, max_repeats=3, total=None)
SOURCES = {"crops": ["plantvillage", "plantdoc", "weeds", "fruits", "nutrients"],
           "livestock": ["cattle", "poultry", "sheep"], "fishery": ["fish", "freshness"]}
GENERAL_SOURCES = ["cc3m", "laion"]


def _hex_uids(rng: np.random.Generator, rows: int, width: int = 20) -> "pa.Array":  # noqa: F821  (pyarrow imported inside)
    """``rows`` random fixed-width hex strings, built straight into an Arrow string buffer."""
    import pyarrow as pa

    nibbles = rng.integers(0, 16, size=(rows, width), dtype=np.uint8)
    chars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def make_input(path: Path, rows: int, seed: int = 0) -> None:
    """13M-row pool: ~77% labeled domain rows (Zipf class sizes), ~23% unlabeled general rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_general = int(rows * 0.23)
    n_domain = rows - n_general
    n_classes = 2000
    # Zipf-skewed class sizes (exponent 1.1), shuffled over the domains.
    p = 1.0 / np.arange(1, n_classes + 1) ** 1.1
    p /= p.sum()
    cls_of_row = rng.choice(n_classes, size=n_domain, p=p).astype(np.int32)
    class_domain = rng.choice(3, size=n_classes, p=[0.7, 0.2, 0.1])
    domains = ["crops", "livestock", "fishery"]
    class_source = np.array([rng.integers(len(SOURCES[domains[d]])) for d in class_domain])
    class_names = pa.array([f"{domains[d]} class {i:04d}" for i, d in enumerate(class_domain)])
    dom_names = pa.array(domains + ["general"])
    src_names = pa.array([s for d in domains for s in SOURCES[d]] + GENERAL_SOURCES)
    src_offset = {d: sum(len(SOURCES[x]) for x in domains[:i]) for i, d in enumerate(domains)}
    class_src_code = np.array([src_offset[domains[d]] + s for d, s in zip(class_domain, class_source)], np.int32)
    dom_code = np.concatenate([class_domain[cls_of_row].astype(np.int32), np.full(n_general, 3, np.int32)])
    src_code = np.concatenate([class_src_code[cls_of_row],
                               len(src_names) - 2 + rng.integers(0, 2, n_general).astype(np.int32)])
    cls_idx = pa.array(np.concatenate([cls_of_row, np.zeros(n_general, np.int32)]),
                       mask=np.concatenate([np.zeros(n_domain, bool), np.ones(n_general, bool)]))
    # Interleave domain and general rows as a real pool would be (by ingest part, roughly).
    order = rng.permutation(rows)
    uids = _hex_uids(rng, rows)
    t = pa.table({
        "uid": uids,
        "domain": pa.DictionaryArray.from_arrays(pa.array(dom_code[order]), dom_names),
        "source": pa.DictionaryArray.from_arrays(pa.array(src_code[order]), src_names),
        "class_name": pa.DictionaryArray.from_arrays(cls_idx.take(pa.array(order)), class_names),
    })
    pq.write_table(t, path, row_group_size=1 << 20)


# ----------------------------------------------------------------------------------------------
# the baselines: the same spec written competently in pandas and in polars
# ----------------------------------------------------------------------------------------------


def allocate(dom: np.ndarray, n: np.ndarray, unl: np.ndarray, domains: list[str], shares: dict, temperature: float,
             cap: int, max_repeats: int) -> np.ndarray:
    """Rows per group (a few thousand groups: not where the time goes): bucket rows by largest
    remainder, then per bucket a proportional split to n ** (1 / T), clamped to the caps, excess re-spread."""
    gcap = np.where(unl, n * min(cap, max_repeats), np.minimum(cap, n * max_repeats)).astype(np.int64)
    cap1 = np.where(unl, n, np.minimum(cap, n))
    w = np.where(unl, n.astype(float), n ** (1.0 / temperature))
    s = np.array([shares[d] for d in domains])
    bcap = np.bincount(dom, gcap, len(domains))
    bcap1 = np.bincount(dom, cap1, len(domains))
    total = int(np.floor(min((bcap1 / s).max(), (bcap / s).min()) + 1e-9))
    want = s * total
    brows = np.floor(want).astype(np.int64)
    brows[np.argsort(-(want - brows), kind="stable")[: total - brows.sum()]] += 1
    a = np.zeros(len(n), np.int64)
    for b in range(len(domains)):
        g = np.flatnonzero(dom == b)
        fixed = np.zeros(len(g), bool)
        while True:
            x = np.where(fixed, gcap[g], 0.0)
            free = ~fixed
            x[free] = (brows[b] - gcap[g][fixed].sum()) * w[g][free] / w[g][free].sum()
            over = free & (x > gcap[g])
            if not over.any():
                break
            fixed |= over
        ai = np.floor(x + 1e-9).astype(np.int64)
        r = int(brows[b] - ai.sum())
        if r:
            frac = np.where(ai < gcap[g], x - ai, -1.0)
            ai[np.argsort(-frac, kind="stable")[:r]] += 1
        a[g] = ai
    return a


def pandas_mix(df, shares: dict, temperature: float, cap: int, max_repeats: int, seed: int):
    """Category codes -> one group id per row -> group sizes -> allocation -> seeded rank per group -> repeats."""
    import pandas as pd

    domains = list(df["domain"].cat.categories)
    dcode = df["domain"].cat.codes.to_numpy().astype(np.int64)
    ccode = df["class_name"].cat.codes.to_numpy().astype(np.int64)  # -1 = unlabeled
    ncls = len(df["class_name"].cat.categories) + 1
    gid, keys = pd.factorize(dcode * ncls + ccode + 1, sort=False)
    n = np.bincount(gid)
    a = allocate(keys // ncls, n, keys % ncls == 0, domains, shares, temperature, cap, max_repeats)
    base, extra = a // n, a % n
    # the shuffle-then-cumcount idiom (df.sample(frac=1).groupby(...).cumcount()) on the group ids only
    order = np.random.default_rng(seed).permutation(len(df))
    rank = np.empty(len(df), dtype=np.int64)
    rank[order] = pd.Series(gid[order]).groupby(gid[order], sort=False).cumcount().to_numpy()
    repeats = (base[gid] + (rank < extra[gid])).astype("int32")
    keep = repeats > 0
    return pd.DataFrame({"uid": df["uid"][keep].reset_index(drop=True), "repeats": repeats[keep],
                         "bucket": df["domain"][keep].reset_index(drop=True)})


def polars_mix(df, shares: dict, temperature: float, cap: int, max_repeats: int, seed: int):
    """group_by sizes -> allocation -> join back -> seeded rank over each group -> repeats (lazy, one plan)."""
    import polars as pl

    keys = ["domain", "class_name"]
    sizes = df.group_by(keys).agg(pl.len().alias("n"))
    domains = sorted(shares, key=list(shares).index)
    dom = sizes["domain"].cast(pl.String).replace_strict({d: i for i, d in enumerate(domains)},
                                                          return_dtype=pl.Int64).to_numpy()
    n = sizes["n"].to_numpy().astype(np.int64)
    a = allocate(dom, n, sizes["class_name"].is_null().to_numpy(), domains, shares, temperature, cap, max_repeats)
    sizes = sizes.with_columns(base=pl.Series(a // n).cast(pl.Int32), extra=pl.Series(a % n)).drop("n")
    r = pl.Series("r", np.random.default_rng(seed).permutation(df.height))
    return (df.lazy().with_columns(r)
            .join(sizes.lazy(), on=keys, how="left", nulls_equal=True)
            .with_columns(repeats=pl.col("base") + (pl.col("r").rank("ordinal").over(keys) <= pl.col("extra")))
            .filter(pl.col("repeats") > 0)
            .select("uid", "repeats", bucket="domain").collect())


# ----------------------------------------------------------------------------------------------
# workers (each in a fresh subprocess)
# ----------------------------------------------------------------------------------------------


def _share_error_pt(rows_by_bucket: dict) -> float:
    tot = sum(rows_by_bucket.values())
    return float(max(abs(rows_by_bucket.get(b, 0) / tot - s) * 100 for b, s in SHARES.items()))


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(kind: str, path: str) -> None:
    import resource

    if kind == "ours":
        import pyarrow.parquet as pq

        from pipeline.mix import mix_table
        from pipeline.recipe import MixConfig

        table = pq.read_table(path)
        cfg = MixConfig(**SPEC)
        c0, t0 = _cpu(), time.perf_counter()
        man, report = mix_table(table, cfg, seed=0)
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        sums = man.group_by("bucket").aggregate([("repeats", "sum")]).to_pydict()
        by_bucket = dict(zip(sums["bucket"], sums["repeats_sum"]))
        unique = man.num_rows
        extra = {"report_max_share_error_pt": report["max_share_error_pt"]}
    elif kind == "pandas":
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Arrow-backed uid strings (pandas' own recommendation; an object column alone would take ~1 GB
        # more), categoricals for the dictionary columns.
        df = pq.read_table(path).to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get)
        c0, t0 = _cpu(), time.perf_counter()
        out = pandas_mix(df, SHARES, SPEC["class_temperature"], SPEC["class_cap"], SPEC["max_repeats"], seed=0)
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        by_bucket = {str(k): int(v) for k, v in out.groupby("bucket", observed=True)["repeats"].sum().items()}
        unique = len(out)
        extra = {}
    else:
        import polars as pl

        df = pl.read_parquet(path)
        c0, t0 = _cpu(), time.perf_counter()
        out = polars_mix(df, SHARES, SPEC["class_temperature"], SPEC["class_cap"], SPEC["max_repeats"], seed=0)
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        sums = out.group_by("bucket").agg(pl.col("repeats").sum())
        by_bucket = {str(k): int(v) for k, v in zip(sums["bucket"], sums["repeats"])}
        unique = out.height
        extra = {}
    res = {
        "seconds": dt,
        "cpu_seconds": cpu,
        "rows_out": int(sum(by_bucket.values())),
        "unique": int(unique),
        "max_share_error_pt": _share_error_pt(by_bucket),
        "rows_by_bucket": {b: int(by_bucket.get(b, 0)) for b in SHARES},
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }
    print("RESULT " + json.dumps(res), flush=True)


def measure(kind: str, path: Path) -> dict:
    """Run one worker in a fresh process; its peak RSS comes from wait4's rusage."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, str(path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n{out}")
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=13_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="Folder for the input parquet (kept).")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    folder = args.keep or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pool_{args.rows}.parquet"
    if not path.exists():
        t0 = time.perf_counter()
        make_input(path, args.rows)
        print(f"input: {args.rows} rows written to {path} in {time.perf_counter() - t0:.1f}s (not timed)")
    sides = {k: (lambda k=k: measure(k, path)) for k in ("ours", "polars", "pandas")}
    measure("polars", path), measure("pandas", path)  # warm-up: page cache, bytecode

    def log(r: int, rec: dict) -> None:
        print(f"round {r}: " + "  ".join(f"{k} {rec[k]['seconds']:.2f}s {rec[k]['peak_rss_mb']:.0f} MB" for k in sides)
              + f"  load {load1()}", flush=True)

    rounds = paired_rounds(args.rounds, sides, log)
    if tmp is not None:
        tmp.cleanup()
    sec = {k: stats([r[k]["seconds"] for r in rounds], higher_is_better=False) for k in sides}
    rss = {k: max(r[k]["peak_rss_mb"] for r in rounds) for k in sides}
    vs = {b: stats([r[b]["seconds"] / r["ours"]["seconds"] for r in rounds]) for b in ("polars", "pandas")}
    err = max(r["ours"]["max_share_error_pt"] for r in rounds)
    plans = {k: rounds[0][k]["rows_by_bucket"] for k in sides}
    summary = {
        "ours": round(sec["ours"]["median"], 3), "baseline": round(sec["polars"]["median"], 3), "unit": "s",
        "speedup": round(vs["polars"]["median"], 3), "speedup_mean": round(vs["polars"]["mean"], 3),
        "speedup_worst": round(vs["polars"]["worst"], 3), "baseline_name": "polars",
        "speedup_vs_pandas": round(vs["pandas"]["median"], 3),
        "speedup_vs_pandas_worst": round(vs["pandas"]["worst"], 3),
        "rounds": args.rounds, "rows": args.rows, "seconds": sec, "peak_rss_mb": rss,
        "max_share_error_pt": err, "rows_out": rounds[0]["ours"]["rows_out"],
        "same_bucket_rows": {b: plans[b] == plans["ours"] for b in ("polars", "pandas")},
        "load": load_range(rounds, list(sides)),
        "target": {"faster_than": ["polars", "pandas"], "least_peak_rss": True, "max_share_error_pt": 0.01},
    }
    summary["met"] = bool(vs["polars"]["median"] > 1 and vs["pandas"]["median"] > 1
                          and rss["ours"] < min(rss["polars"], rss["pandas"]) and err <= 0.01)
    print(f"ours {sec['ours']['median']:.2f}s {rss['ours']:.0f} MB; polars {sec['polars']['median']:.2f}s "
          f"{rss['polars']:.0f} MB; pandas {sec['pandas']['median']:.2f}s {rss['pandas']:.0f} MB (medians of "
          f"{args.rounds} rounds); share error {err:.2e} pt")
    finish("mix_scale", summary, rounds, vars(args), ["pyarrow", "numpy", "pandas", "polars"], args.results)


if __name__ == "__main__":
    main()
