"""Filters over score tables and embeddings: pure functions on numpy arrays, no run-store access.

Every filter returns a keep mask (and where useful the partner that explains a drop), so the stage
can record one reason per dropped row. Similarity searches are exact: blocked matrix products keep
memory at O(n * d + block^2), and a low-dimensional lower bound prunes most blocks of the product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Drop reasons (short snake_case, the same strings in stats, excluded/ and reports).
FAILED_TO_EMBED = "failed_to_embed"
IMAGE_TOO_SMALL = "image_too_small"
EXTREME_ASPECT = "extreme_aspect_ratio"
LOW_SCORE = "low_clip_score"
CONTAMINATED = "eval_contamination"
DUP_EXACT = "duplicate_exact"
DUP_NEAR = "duplicate_near"
BELOW_TOP = "below_top_fraction"
REASONS = (FAILED_TO_EMBED, IMAGE_TOO_SMALL, EXTREME_ASPECT, LOW_SCORE, CONTAMINATED, DUP_EXACT, DUP_NEAR,
           BELOW_TOP)


# ----------------------------------------------------------------------------- per row
def row_filters(width: np.ndarray, height: np.ndarray, score: np.ndarray, min_side: Optional[int],
                max_aspect: Optional[float], min_score: Optional[float]) -> list[Optional[str]]:
    """First failing per-row rule for each row (None = passes). NaN scores mean 'not embedded'.

    Args:
        width, height: image size in pixels (original size where known).
        score: CLIP score per row (NaN where the image could not be embedded).
        min_side: drop images whose shorter side is below this.
        max_aspect: drop images whose long/short side ratio exceeds this.
        min_score: drop pairs scoring below this.
    """
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    out: list[Optional[str]] = [None] * len(s)
    short, long = np.minimum(w, h), np.maximum(w, h)
    for i in range(len(s)):
        if np.isnan(s[i]):
            out[i] = FAILED_TO_EMBED
        elif min_side is not None and short[i] < min_side:
            out[i] = IMAGE_TOO_SMALL
        elif max_aspect is not None and long[i] > max_aspect * short[i]:
            out[i] = EXTREME_ASPECT
        elif min_score is not None and s[i] < min_score:
            out[i] = LOW_SCORE
    return out


def priority_order(score: np.ndarray, uid: Sequence[str]) -> np.ndarray:
    """Row indices best first: higher score, then smaller uid (deterministic keeper for duplicates)."""
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    return np.lexsort((np.asarray(uid, dtype=object).astype(str), -s))


def top_fraction(score: np.ndarray, uid: Sequence[str], fraction: float,
                 groups: Optional[Sequence[object]] = None) -> np.ndarray:
    """Keep mask of the best ``ceil(fraction * n)`` rows, globally or within each group."""
    n = len(score)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    if groups is None:
        order = priority_order(score, uid)
        keep[order[: math.ceil(fraction * n)]] = True
        return keep
    g = np.array([repr(x) for x in groups], dtype=object)
    for key in sorted(set(g.tolist())):
        idx = np.flatnonzero(g == key)
        order = priority_order(np.asarray(score)[idx], np.asarray(uid, dtype=object)[idx])
        keep[idx[order[: math.ceil(fraction * len(idx))]]] = True
    return keep


def exact_duplicates(sha256: Sequence[Optional[str]], rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose sha256 repeats one of a better-ranked row.

    Args:
        sha256: content hash per row (None never matches).
        rank: priority per row, lower is better (e.g. the inverse of :func:`priority_order`).

    Returns:
        (keep mask, keeper index per row: -1 for kept rows).
    """
    n = len(sha256)
    keep = np.ones(n, dtype=bool)
    keeper = np.full(n, -1, dtype=np.int64)
    best: dict[str, int] = {}
    for i in np.argsort(rank, kind="stable"):
        h = sha256[i]
        if h is None:
            continue
        if h in best:
            keep[i] = False
            keeper[i] = best[h]
        else:
            best[h] = int(i)
    return keep, keeper


# ----------------------------------------------------------------------------- similarity search
@dataclass
class Matches:
    """Pairs (i, j) with cosine >= tau; for self-search i < j."""

    i: np.ndarray
    j: np.ndarray
    cos: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def _as_unit_f32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12))


def _pca_basis(x: np.ndarray, dims: int, sample: int = 20000, seed: int = 0) -> Optional[np.ndarray]:
    """Orthonormal (d, dims) basis of the top principal directions of a row sample (None when not useful)."""
    n, d = x.shape
    if dims >= d or n < 2 * dims:
        return None
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    s = x[idx].astype(np.float64)
    s -= s.mean(axis=0)
    _, vecs = np.linalg.eigh(s.T @ s)
    return np.ascontiguousarray(vecs[:, ::-1][:, :dims].astype(np.float32))


def cosine_matches(a: np.ndarray, tau: float, b: Optional[np.ndarray] = None, block: int = 8192,
                   prune_dims: Optional[int] = 64, threads: Optional[int] = None) -> Matches:
    """All pairs with cosine >= ``tau``, exactly, in blocks.

    Self-search (``b is None``) returns each pair once with i < j; cross-search returns (row of a,
    row of b). Rows are L2-normalised here. Memory: the inputs plus one block x block product.

    Pruning: for unit vectors, cos >= tau iff ||u - v||^2 <= 2 - 2 tau, and the distance between the
    projections onto any orthonormal basis P is a lower bound of ||u - v||. A block pair is first
    compared in ``prune_dims`` principal directions (much cheaper); only block pairs that may hold a
    match are then multiplied in full. Results are identical to the full product.

    Args:
        a: (n, d) embeddings.
        tau: cosine threshold in (0, 1].
        b: optional (m, d) second set (cross-search).
        block: rows per block (block^2 * 4 bytes of scratch memory).
        prune_dims: dimensions of the lower-bound projection (None disables pruning).
        threads: torch intra-op threads (None: leave as configured).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    xa = torch.from_numpy(_as_unit_f32(a))
    cross = b is not None
    xb = torch.from_numpy(_as_unit_f32(b)) if cross else xa
    n, m = xa.shape[0], xb.shape[0]
    if n == 0 or m == 0:
        return Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    basis = None
    if prune_dims:
        both = np.concatenate([xa.numpy(), xb.numpy()]) if cross else xa.numpy()
        bnp = _pca_basis(both, prune_dims)
        basis = torch.from_numpy(bnp) if bnp is not None else None
    if basis is not None:
        # Augmented projections: [-2p, |p|^2, 1] . [p', 1, |p'|^2] = |p - p'|^2, one GEMM per block pair.
        pa = xa @ basis
        qa = (pa * pa).sum(1, keepdim=True)
        ones_a = torch.ones_like(qa)
        la = torch.cat([-2.0 * pa, qa, ones_a], 1)
        if cross:
            pb = xb @ basis
            qb = (pb * pb).sum(1, keepdim=True)
            rb = torch.cat([pb, torch.ones_like(qb), qb], 1)
        else:
            rb = torch.cat([pa, ones_a, qa], 1)
    # Squared-distance budget plus a float margin so rounding never hides a true match.
    budget = 2.0 - 2.0 * tau + 1e-4
    out_i, out_j, out_c = [], [], []
    for s in range(0, n, block):
        ea = min(n, s + block)
        a_blk = xa[s:ea]
        for t in range(0 if cross else s, m, block):
            eb = min(m, t + block)
            if basis is not None:
                # Lower bound of the squared distance between every pair of the block.
                cand = (la[s:ea] @ rb[t:eb].T) <= budget
                if not cross and t == s:
                    cand = torch.triu(cand, diagonal=1)
                ci, cj = torch.nonzero(cand, as_tuple=True)
                if ci.numel() == 0:
                    continue
                if ci.numel() * 8 < (ea - s) * (eb - t):
                    # Few candidates: check each one in full dimension instead of the whole block.
                    cos = (a_blk[ci] * xb[t + cj]).sum(1)
                    ok = cos >= tau
                    out_i.append((ci[ok] + s).numpy())
                    out_j.append((cj[ok] + t).numpy())
                    out_c.append(cos[ok].numpy())
                    continue
            sim = a_blk @ xb[t:eb].T
            hit = sim >= tau
            if not cross and t == s:
                hit = torch.triu(hit, diagonal=1)
            ci, cj = torch.nonzero(hit, as_tuple=True)
            if ci.numel():
                out_i.append((ci + s).numpy())
                out_j.append((cj + t).numpy())
                out_c.append(sim[ci, cj].numpy())
    if not out_i:
        return Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    i, j, c = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_c).astype(np.float32)
    order = np.lexsort((j, i))
    return Matches(i[order].astype(np.int64), j[order].astype(np.int64), c[order])


def greedy_keep(n: int, matches: Matches, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resolve near-duplicate pairs: walk rows best-ranked first; a row is dropped when it matches a kept row.

    Unlike dropping every row of a connected component but one, a chain a~b~c with a !~ c keeps c
    when b was dropped because of a.

    Returns:
        (keep mask, keeper index per dropped row (-1 otherwise), cosine to that keeper (NaN otherwise)).
    """
    keep = np.ones(n, dtype=bool)
    keeper = np.full(n, -1, dtype=np.int64)
    kcos = np.full(n, np.nan, dtype=np.float32)
    if len(matches) == 0:
        return keep, keeper, kcos
    rank = np.asarray(rank)
    i, j, c = matches.i, matches.j, matches.cos
    better_first = rank[i] < rank[j]
    hi = np.where(better_first, i, j)
    lo = np.where(better_first, j, i)
    # Group partners by the worse row; within a group, consider better partners first (then higher cosine).
    order = np.lexsort((-c, rank[hi], rank[lo]))
    hi, lo, c = hi[order], lo[order], c[order]
    starts = np.flatnonzero(np.r_[True, lo[1:] != lo[:-1]])
    ends = np.r_[starts[1:], len(lo)]
    for s, e in zip(starts, ends):  # groups come in rank order of the worse row
        for k in range(s, e):
            if keep[hi[k]]:
                r = lo[s]
                keep[r] = False
                keeper[r] = hi[k]
                kcos[r] = c[k]
                break
    return keep, keeper, kcos


def any_match(n: int, matches: Matches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the first set with at least one match in the second: (hit mask, best partner, its cosine)."""
    hit = np.zeros(n, dtype=bool)
    partner = np.full(n, -1, dtype=np.int64)
    pcos = np.full(n, np.nan, dtype=np.float32)
    if len(matches):
        order = np.lexsort((matches.j, -matches.cos, matches.i))
        i, j, c = matches.i[order], matches.j[order], matches.cos[order]
        first = np.r_[True, i[1:] != i[:-1]]
        hit[i] = True
        partner[i[first]] = j[first]
        pcos[i[first]] = c[first]
    return hit, partner, pcos
