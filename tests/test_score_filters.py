"""Score filters on constructed tables and embeddings with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.score import filters as F


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_row_filters_first_failing_rule_wins():
    w = np.array([300, 20, 1000, 300, 300, 300])
    h = np.array([300, 300, 100, 300, 300, 250])
    s = np.array([0.30, 0.30, 0.30, 0.10, np.nan, 0.25])
    out = F.row_filters(w, h, s, min_side=32, max_aspect=3.0, min_score=0.25)
    assert out == [None, "image_too_small", "extreme_aspect_ratio", "low_clip_score", "failed_to_embed", None]
    # Every rule is optional.
    assert F.row_filters(w, h, s, None, None, None) == [None, None, None, None, "failed_to_embed", None]


def test_priority_order_best_score_then_uid():
    order = F.priority_order(np.array([0.2, 0.5, 0.5, np.nan]), ["d", "c", "b", "a"])
    assert order.tolist() == [2, 1, 0, 3]


def test_top_fraction_global_and_grouped():
    s = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    uid = [f"u{i}" for i in range(6)]
    assert F.top_fraction(s, uid, 0.5).tolist() == [True, False, True, False, True, False]
    # ceil: a third of 6 is 2 rows; per group of 3, ceil(0.34 * 3) = 2.
    assert F.top_fraction(s, uid, 1 / 3).sum() == 2
    groups = ["a", "a", "a", "b", "b", "b"]
    assert F.top_fraction(s, uid, 0.34, groups).tolist() == [True, False, True, True, True, False]
    # Ties are broken by uid, so the result does not depend on row order.
    t = np.array([0.5, 0.5, 0.5])
    assert F.top_fraction(t, ["c", "a", "b"], 0.3).tolist() == [False, True, False]


def test_exact_duplicates_keep_best_ranked_copy():
    sha = ["x", "y", "x", None, None, "x"]
    rank = np.array([2, 0, 1, 3, 4, 5])
    keep, keeper = F.exact_duplicates(sha, rank)
    assert keep.tolist() == [False, True, True, True, True, False]
    assert keeper.tolist() == [2, -1, -1, -1, -1, 2]


def _brute(a, tau, b=None):
    a = _unit(a.astype(np.float64))
    bb = a if b is None else _unit(b.astype(np.float64))
    sim = a @ bb.T
    i, j = np.nonzero(sim >= tau)
    if b is None:
        keep = i < j
        i, j = i[keep], j[keep]
    return set(zip(i.tolist(), j.tolist()))


@pytest.fixture(scope="module")
def clustered():
    """200 points in 10 tight-ish clusters in 64-d, plus exact and near copies planted."""
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(10, 64)))
    x = centers[rng.integers(0, 10, 200)] + rng.normal(scale=0.03, size=(200, 64))
    x[10] = x[3]  # exact copy
    x[11] = x[4] + rng.normal(scale=1e-3, size=64)  # near copy
    return _unit(x).astype(np.float32)


@pytest.mark.parametrize("prune", [None, 8])
@pytest.mark.parametrize("block", [48, 1000])
def test_cosine_matches_equals_brute_force(clustered, prune, block):
    for tau in (0.9, 0.97, 0.999):
        m = F.cosine_matches(clustered, tau, block=block, prune_dims=prune)
        got = set(zip(m.i.tolist(), m.j.tolist()))
        assert got == _brute(clustered, tau), (tau, block, prune)
        assert (m.i < m.j).all() and (m.cos >= tau).all()
    m = F.cosine_matches(clustered, 0.999, block=block, prune_dims=prune)
    assert (3, 10) in set(zip(m.i.tolist(), m.j.tolist())) and (4, 11) in set(zip(m.i.tolist(), m.j.tolist()))


def test_cosine_matches_cross(clustered):
    a, b = clustered[:80], clustered[80:]
    for prune in (None, 8):
        m = F.cosine_matches(a, 0.97, b, block=32, prune_dims=prune)
        assert set(zip(m.i.tolist(), m.j.tolist())) == _brute(a, 0.97, b)
    assert len(F.cosine_matches(a[:0], 0.9, b)) == 0


def test_greedy_keep_chain_and_keeper():
    # a~b, b~c, a!~c; ranks a < b < c: b goes (matches kept a), c stays (its only partner b is gone).
    m = F.Matches(np.array([0, 1]), np.array([1, 2]), np.array([0.99, 0.98], np.float32))
    keep, keeper, kcos = F.greedy_keep(3, m, np.array([0, 1, 2]))
    assert keep.tolist() == [True, False, True]
    assert keeper.tolist() == [-1, 0, -1] and kcos[1] == pytest.approx(0.99)
    # Reverse the ranks: c is best; b goes (matches c), a stays.
    keep, keeper, _ = F.greedy_keep(3, m, np.array([2, 1, 0]))
    assert keep.tolist() == [True, False, True] and keeper[1] == 2
    # A star: everyone matches the best-ranked row 3.
    m = F.Matches(np.array([0, 1, 2]), np.array([3, 3, 3]), np.array([0.97, 0.98, 0.99], np.float32))
    keep, keeper, _ = F.greedy_keep(4, m, np.array([1, 2, 3, 0]))
    assert keep.tolist() == [False, False, False, True] and keeper[:3].tolist() == [3, 3, 3]


def test_any_match_reports_the_closest_partner():
    m = F.Matches(np.array([0, 0, 2]), np.array([5, 7, 1]), np.array([0.97, 0.99, 0.98], np.float32))
    hit, partner, pcos = F.any_match(4, m)
    assert hit.tolist() == [True, False, True, False]
    assert partner.tolist() == [7, -1, 1, -1] and pcos[0] == pytest.approx(0.99)
