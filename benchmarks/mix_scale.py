"""Mixer at PlantMix scale: 13M pool rows, ours vs a straightforward pandas version of the same spec.

Input (generation not timed): 3 domains with 2000 Zipf-skewed classes over 10 sources, plus an
unlabeled general pool, written once to a parquet file. Each implementation then runs in a fresh
subprocess that reads the file (not timed), mixes (timed) and reports its peak RSS (ru_maxrss of the
child, input included). Spec: shares crops .45 / livestock .20 / fishery .12 / general .23, class
temperature 2, class cap 20000, max repeats 3, total "as large as the caps allow".

Usage: python benchmarks/mix_scale.py [--rows 13000000] [--keep DIR]
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

SHARES = {"crops": 0.45, "livestock": 0.20, "fishery": 0.12, "general": 0.23}
SPEC = dict(shares=SHARES, class_temperature=2.0, class_cap=20000, max_repeats=3, total=None)
SOURCES = {"crops": ["plantvillage", "plantdoc", "weeds", "fruits", "nutrients"],
           "livestock": ["cattle", "poultry", "sheep"], "fishery": ["fish", "freshness"]}
GENERAL_SOURCES = ["cc3m", "laion"]


def _hex_uids(rng: np.random.Generator, rows: int, width: int = 20) -> "pa.Array":
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
# the straightforward pandas version of the same spec
# ----------------------------------------------------------------------------------------------


def pandas_mix(df, shares: dict, temperature: float, cap: int, max_repeats: int, seed: int):
    """groupby sizes -> allocations (iterative water-filling) -> seeded per-group rank -> repeats."""
    import pandas as pd

    cls = df["class_name"].cat.add_categories(["__unlabeled__"]).fillna("__unlabeled__")
    grouped = df.groupby([df["domain"], cls], observed=True, sort=False)
    gid = grouped.ngroup()
    sizes = grouped.size().rename("n").reset_index()  # row i = group i
    unl = sizes["class_name"] == "__unlabeled__"
    sizes["cap"] = np.where(unl, sizes["n"] * min(cap, max_repeats), np.minimum(cap, sizes["n"] * max_repeats))
    sizes["cap1"] = np.where(unl, sizes["n"], np.minimum(cap, sizes["n"]))
    sizes["w"] = np.where(unl, sizes["n"], sizes["n"] ** (1.0 / temperature))
    bcap = sizes.groupby("domain", observed=True)[["cap", "cap1"]].sum()
    s = pd.Series(shares)
    once = (bcap["cap1"] / s).max()
    total = int(np.floor(min(once, (bcap["cap"] / s).min()) + 1e-9))
    want = s * total
    brows = np.floor(want).astype(int)
    rest = total - brows.sum()
    brows[(want - brows).sort_values(ascending=False, kind="stable").index[:rest]] += 1

    sizes["a"] = 0
    for dom, g in sizes.groupby("domain", observed=True, sort=False):
        target = brows[dom]
        fixed = pd.Series(False, index=g.index)
        x = pd.Series(0.0, index=g.index)
        while True:  # proportional split, clamp to caps, re-spread the excess
            left = target - g.loc[fixed, "cap"].sum()
            free = ~fixed
            x[free] = left * g.loc[free, "w"] / g.loc[free, "w"].sum()
            x[fixed] = g.loc[fixed, "cap"]
            over = free & (x > g["cap"])
            if not over.any():
                break
            fixed |= over
        a = np.floor(x + 1e-9).astype(int)
        r = int(target - a.sum())
        if r:
            frac = (x - a).where(a < g["cap"], -1.0)
            a[frac.sort_values(ascending=False, kind="stable").index[:r]] += 1
        sizes.loc[g.index, "a"] = a
    base = (sizes["a"] // sizes["n"]).to_numpy()
    extra = (sizes["a"] % sizes["n"]).to_numpy()
    # the shuffle-then-cumcount idiom (df.sample(frac=1).groupby(...).cumcount()) on the group ids only
    g = gid.to_numpy()
    order = np.random.default_rng(seed).permutation(len(df))
    rank = np.empty(len(df), dtype=np.int64)
    rank[order] = pd.Series(g[order]).groupby(g[order]).cumcount().to_numpy()
    repeats = (base[g] + (rank < extra[g])).astype("int32")
    keep = repeats > 0
    return pd.DataFrame({"uid": df["uid"][keep].reset_index(drop=True), "repeats": repeats[keep],
                         "bucket": df["domain"][keep].reset_index(drop=True)})


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
    else:
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
    ap.add_argument("--repeat", type=int, default=1, help="Runs per implementation (best time is reported).")
    ap.add_argument("--keep", type=Path, default=None, help="Folder for the input parquet (kept).")
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
    runs = {"ours": [], "pandas": []}
    for _ in range(args.repeat):
        for kind in runs:
            r = measure(kind, path)
            runs[kind].append(r)
            print(f"{kind:>6}: {r['seconds']:.2f}s ({r['cpu_seconds']:.2f}s CPU), peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"{r['rows_out']} rows ({r['unique']} unique), max share error {r['max_share_error_pt']:.6f} pt")
    ours = min(runs["ours"], key=lambda r: r["seconds"])
    base = min(runs["pandas"], key=lambda r: r["seconds"])
    same_plan = ours["rows_by_bucket"] == base["rows_by_bucket"]
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps({
        "benchmark": "mix_scale",
        "ours": round(ours["seconds"], 3),
        "baseline": round(base["seconds"], 3),
        "unit": "s",
        "speedup": round(base["seconds"] / ours["seconds"], 2),
        "rows": args.rows,
        "seconds": {"ours": round(ours["seconds"], 3), "pandas": round(base["seconds"], 3)},
        "cpu_seconds": {"ours": round(ours["cpu_seconds"], 3), "pandas": round(base["cpu_seconds"], 3)},
        "load_average_1m": round(os.getloadavg()[0], 2),
        "peak_rss_mb": {"ours": round(ours["peak_rss_mb"]), "pandas": round(base["peak_rss_mb"])},
        "max_share_error_pt": ours["max_share_error_pt"],
        "baseline_max_share_error_pt": base["max_share_error_pt"],
        "rows_out": ours["rows_out"],
        "same_bucket_rows_as_baseline": same_plan,
        "targets": {"seconds": 5.0, "peak_rss_mb": 1500, "max_share_error_pt": 0.01},
    }))


if __name__ == "__main__":
    main()
