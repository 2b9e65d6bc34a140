"""Near-duplicate search on clustered embeddings (512-d, fp16 as stored) on 2 threads: ours vs faiss exact.

Ours: pipeline.score.filters.cosine_matches (exact, blocked, with a low-dimensional lower bound that
skips most of the product). Baseline: faiss-cpu ``IndexFlatIP`` (exact inner product, the index its
docs give for cosine on normalised vectors) with ``range_search`` at the threshold, the same thread
count. Both return every pair with cosine >= tau; the pair sets are compared (recall of ours against
faiss). Paired rounds alternate the order, after one warm-up each.

Usage: python benchmarks/neardup_100k.py [--n 30000] [--dim 512] [--tau 0.96] [--rounds 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish, load1, load_range, paired_rounds, stats  # noqa: E402

from pipeline.score import filters as F  # noqa: E402


def clustered_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in clusters of ~20 with varied spread (within-cluster cosine ~0.85-0.99), plus 1% copies."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 20)
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    which = rng.integers(0, n_clusters, n)
    spread = rng.uniform(0.004, 0.02, n_clusters).astype(np.float32)
    x = centers[which] + rng.normal(size=(n, dim)).astype(np.float32) * spread[which, None]
    copies = rng.choice(n, n // 100, replace=False)
    x[copies] = x[rng.integers(0, n, len(copies))] + rng.normal(scale=1e-3, size=(len(copies), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)  # as stored in img_emb_N.npy


def faiss_pairs(x: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j with inner product >= tau, from an exact flat index."""
    import faiss

    xf = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(xf.shape[1])
    index.add(xf)
    lims, _, nbr = index.range_search(xf, tau)
    row = np.repeat(np.arange(len(xf)), np.diff(lims.astype(np.int64)))
    keep = nbr > row
    return row[keep], nbr[keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tau", type=float, default=0.96)
    ap.add_argument("--block", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args()
    import faiss
    import torch

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    x = clustered_embeddings(args.n, args.dim)
    got: dict[str, set] = {}

    def ours() -> dict:
        m = F.cosine_matches(x, args.tau, block=args.block)
        got["ours"] = set(zip(m.i.tolist(), m.j.tolist()))
        return {"pairs": len(m)}

    def base() -> dict:
        i, j = faiss_pairs(x, args.tau)
        got["faiss"] = set(zip(i.tolist(), j.tolist()))
        return {"pairs": len(i)}

    ours(), base()  # warm-up
    rounds = paired_rounds(args.rounds, {"ours": ours, "faiss": base}, lambda r, rec: print(
        f"round {r}: ours {rec['ours']['seconds']:.2f}s  faiss {rec['faiss']['seconds']:.2f}s  load {load1()}",
        flush=True))
    both = len(got["ours"] & got["faiss"])
    recall = both / len(got["faiss"]) if got["faiss"] else 1.0
    precision = both / len(got["ours"]) if got["ours"] else 1.0
    sec = {k: stats([r[k]["seconds"] for r in rounds], higher_is_better=False) for k in ("ours", "faiss")}
    sp = stats([r["faiss"]["seconds"] / r["ours"]["seconds"] for r in rounds])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"ours {sec['ours']['median']:.2f}s, faiss IndexFlatIP {sec['faiss']['median']:.2f}s (medians of "
          f"{args.rounds}); {len(got['ours'])} pairs >= {args.tau}, recall {recall:.4f}, precision {precision:.4f}")
    summary = {"ours": round(sec["ours"]["median"], 3), "baseline": round(sec["faiss"]["median"], 3), "unit": "s",
               "speedup": round(sp["median"], 3), "speedup_mean": round(sp["mean"], 3),
               "speedup_worst": round(sp["worst"], 3), "rounds": args.rounds, "seconds": sec, "n": args.n,
               "dim": args.dim, "tau": args.tau, "pairs": len(got["ours"]), "recall": recall, "precision": precision,
               "peak_rss_mb": round(peak_mb), "threads": 2,
               "load": load_range(rounds, ("ours", "faiss")),
               "target": {"speedup": 1.0, "recall": 0.99}}
    summary["met"] = bool(sp["median"] >= 1.0 and recall >= 0.99)
    finish("neardup_100k", summary, rounds, vars(args), ["numpy", "torch", "faiss-cpu"], args.results)


if __name__ == "__main__":
    main()
