"""Mixer core: target shares per bucket -> exact row counts per bucket, per class and per sample.

Everything here is vectorised over the rows (numpy / pyarrow); Python loops only run over buckets.
The steps:

1. **Encode.** Rows get a bucket id (domain, ``domain/source`` or source) and a class id inside the
   bucket. Rows whose ``class_name`` is null (captioned general data) are each their own class of one
   sample: the cap and the temperature cannot shrink them, and they are drawn uniformly. In the report
   they are summed up as one ``(unlabeled)`` line.
2. **Capacities.** A class of ``n`` samples can supply at most ``min(class_cap, n * max_repeats)``
   rows (``class_cap`` counts repeats); a bucket's capacity is the sum over its classes.
3. **Bucket rows.** Target shares (explicit, from ``general_share``, or proportional to the pool) and
   the total give exact integer rows per bucket by largest remainder, so a realised share is off its
   target by less than ``1 / total``. Targets beyond a bucket's capacity are *infeasible*: they are
   listed with the reason and the two closest feasible mixes (same shares with a smaller total, or the
   same total with other shares), and ``on_infeasible`` picks which one is built (or raises).
4. **Class rows.** A bucket's rows are split over its classes in proportion to ``n ** (1 / T)``
   (temperature sampling) with each class capped at its capacity; what a capped class cannot take is
   re-spread over the others (water-filling), again in exact integers.
5. **Sample repeats.** A class allocated ``a`` rows over ``n`` samples gives every sample ``a // n``
   copies and one more to ``a % n`` of them, picked by a seeded permutation. With a cap below the
   class size this is MetaCLIP's keep probability ``min(1, t / n)``, realised as exactly ``t`` samples.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..recipe import MixConfig
from ..tables import MANIFEST

log = logging.getLogger(__name__)

GENERAL = "general"
UNLABELED = "(unlabeled)"
REQUIRED_COLUMNS = ("uid", "domain", "source", "class_name")
# Per-row outcome codes (excluded rows are recorded with these reasons).
KEPT, NOT_IN_MIX, CLASS_CAP, DOWNSAMPLED = 0, 1, 2, 3
REASONS = {NOT_IN_MIX: "bucket_not_in_mix", CLASS_CAP: "class_cap", DOWNSAMPLED: "downsampled"}
_EPS = 1e-9


class MixInfeasibleError(ValueError):
    """Targets the pool cannot meet with ``on_infeasible: error``.

    ``result`` holds the plan without draws; the mix stage adds ``report`` (what is possible) from it.
    """

    def __init__(self, message: str, result: "MixResult"):
        super().__init__(message)
        self.result = result
        self.report: dict[str, Any] = {}


@dataclass
class Pool:
    """The input rows, encoded: bucket and class id per row, sizes per class."""

    n_rows: int
    row_bucket: np.ndarray  # int32, bucket id per row
    row_class: np.ndarray  # int32, class id per row; classes are grouped by bucket
    bucket_names: list[str]
    bucket_domain: list[str]
    class_bucket: np.ndarray  # int64, bucket id per class
    class_names: list[Optional[str]]  # None = the unlabeled rows of the bucket (one class per row)
    class_size: np.ndarray  # int64

    @property
    def unlabeled(self) -> np.ndarray:
        return np.array([c is None for c in self.class_names], dtype=bool)


@dataclass
class Plan:
    """Rows per bucket and per class, and every target that could not be met."""

    shares: np.ndarray  # target share per bucket (sums to 1 over the mixed buckets)
    requested_total: int
    total: int
    feasible: bool
    bucket_rows: np.ndarray  # int64
    bucket_cap1: np.ndarray  # int64: rows without repeats (after class caps)
    bucket_cap: np.ndarray  # int64: rows with max_repeats (after class caps)
    class_weight: np.ndarray  # float64 (temperature weight)
    class_cap: np.ndarray  # int64
    class_rows: np.ndarray  # int64
    unmet: list[dict[str, Any]] = field(default_factory=list)
    closest: dict[str, Any] = field(default_factory=dict)


@dataclass
class MixResult:
    """Everything the stage needs: per-row repeats, the pool, the plan."""

    pool: Pool
    plan: Plan
    cfg: MixConfig
    repeats: np.ndarray  # int32 per input row (0 = not in the mix)

    def outcome(self) -> np.ndarray:
        """int8 per input row: KEPT, or why it is out (NOT_IN_MIX / CLASS_CAP / DOWNSAMPLED)."""
        pool, pl = self.pool, self.plan
        if not pool.n_rows:
            return np.zeros(0, np.int8)
        capped = capped_classes(pool, pl, self.cfg)
        class_code = np.where(pl.shares[pool.class_bucket] <= 0, NOT_IN_MIX,
                              np.where(capped, CLASS_CAP, DOWNSAMPLED)).astype(np.int8)
        return np.where(self.repeats > 0, np.int8(KEPT), class_code[pool.row_class]).astype(np.int8)


# ----------------------------------------------------------------------------------------------
# integer allocation
# ----------------------------------------------------------------------------------------------


def water_fill(weights: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` integer units in proportion to ``weights`` with per-item ``caps``.

    Items that hit their cap keep the cap and the rest is re-spread over the others in proportion to
    their weights (the water level ``lam`` solves ``sum(min(cap, lam * w)) == total``). The real
    solution is rounded by largest remainder, ties going to the earlier item, so the result sums to
    exactly ``min(total, sum(caps[weights > 0]))`` and never exceeds a cap.

    Args:
        weights: Non-negative weight per item; items of weight 0 get nothing.
        caps: Non-negative integer capacity per item.
        total: Units to hand out.

    Returns:
        int64 allocation per item.
    """
    w = np.asarray(weights, dtype=np.float64)
    cap = np.asarray(caps, dtype=np.int64)
    out = np.zeros(len(w), dtype=np.int64)
    live = (w > 0) & (cap > 0)
    if total <= 0 or not live.any():
        return out
    idx = np.flatnonzero(live)
    w_l, cap_l = w[idx], cap[idx]
    if total >= int(cap_l.sum()):
        out[idx] = cap_l
        return out
    ratio = cap_l / w_l
    order = np.argsort(ratio, kind="stable")
    r_s, c_s, w_s = ratio[order], cap_l[order].astype(np.float64), w_l[order]
    cap_before = np.concatenate(([0.0], np.cumsum(c_s)[:-1]))  # caps of items saturated before k
    w_from = np.cumsum(w_s[::-1])[::-1]  # weight of items k.. (not yet saturated)
    level_total = cap_before + r_s * w_from  # units handed out when the level reaches item k's cap
    k = int(np.searchsorted(level_total, total, side="left"))
    lam = (total - cap_before[k]) / w_from[k]
    x = np.minimum(cap_l.astype(np.float64), lam * w_l)
    base = np.minimum(np.floor(x + _EPS), cap_l).astype(np.int64)
    rest = int(total - base.sum())
    if rest > 0:
        frac = np.where(base < cap_l, x - base, -np.inf)
        pick = np.argsort(-frac, kind="stable")[:rest]
        base[pick] += 1
    elif rest < 0:  # float round-up on exact integers: take back from the smallest remainders
        frac = np.where(base > 0, x - base, np.inf)
        base[np.argsort(frac, kind="stable")[: -rest]] -= 1
    out[idx] = base
    return out


def split_weights(strategy: str, pool_rows: np.ndarray, temperature: float) -> np.ndarray:
    """Fractions (summing to 1) that split a share over buckets holding ``pool_rows`` rows."""
    p = np.asarray(pool_rows, dtype=np.float64)
    if len(p) == 0:
        return p
    if strategy == "equal" or p.sum() <= 0:
        w = np.ones_like(p)
    elif strategy == "temperature":
        w = p ** (1.0 / temperature)
    else:
        w = p
    return w / w.sum()


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------


def _indices_into(ind: pa.Array, out: np.ndarray) -> None:
    """Copy dictionary indices into ``out`` (int32), writing -1 where the value is null."""
    width = ind.type.bit_width // 8
    raw = np.frombuffer(ind.buffers()[1], dtype=f"<i{width}", count=ind.offset + len(ind))[ind.offset:]
    out[:] = raw
    if ind.null_count:
        bits = np.frombuffer(ind.buffers()[0], dtype=np.uint8)
        valid = np.unpackbits(bits, bitorder="little", count=ind.offset + len(ind))[ind.offset:]
        out[valid == 0] = -1


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[Any]]:
    """Dictionary codes (int32, -1 for null) and the dictionary of a string-like column."""
    if isinstance(col, pa.Array):
        col = pa.chunked_array([col])
    if pa.types.is_null(col.type):  # an all-null column read without a type
        col = col.cast(pa.string())
    if pa.types.is_dictionary(col.type):
        col = col.unify_dictionaries()
    else:
        col = pc.dictionary_encode(col)
    out = np.empty(len(col), dtype=np.int32)
    if col.num_chunks == 0:
        return out, []
    pos = 0
    for ch in col.chunks:
        _indices_into(ch.indices, out[pos:pos + len(ch)])
        pos += len(ch)
    return out, col.chunk(col.num_chunks - 1).dictionary.to_pylist()


def _check_input(table: pa.Table) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"mix input lacks column(s) {missing}; it needs {list(REQUIRED_COLUMNS)} "
            f"(pipeline.selection.load gives them), got {table.column_names}"
        )
    for c in ("uid", "domain", "source"):
        col = table[c]
        if col.null_count:
            first = pc.index(pc.is_null(col), True).as_py()
            raise ValueError(f"mix input column {c!r} is null at row {first}: every row needs a {c}")


def _group_codes(key: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of a non-negative int key: (values, counts, compact id per row)."""
    if size <= 50_000_000:
        counts = np.bincount(key, minlength=size)
        values = np.flatnonzero(counts)
        lookup = np.full(size, -1, dtype=np.int32)
        lookup[values] = np.arange(len(values), dtype=np.int32)
        return values, counts[values], lookup[key]
    values, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return values, counts, inverse.astype(np.int32)


def encode(table: pa.Table, cfg: MixConfig) -> Pool:
    """Bucket and class ids per row. Buckets are sorted by name; classes follow the class_name
    dictionary (first appearance for plain strings), the unlabeled rows first in each bucket."""
    _check_input(table)
    n = table.num_rows
    dom, dom_names = _codes(table["domain"])
    need_source = cfg.bucket_by == "source" or cfg.source_split is not None
    if need_source:
        src, src_names = _codes(table["source"])
        ns = len(src_names)
        pair_vals, pair_counts, pair_id = _group_codes(dom.astype(np.int64) * ns + src, max(1, len(dom_names) * ns))
        del src
        pair_dom = [dom_names[v // ns] for v in pair_vals.tolist()]
        pair_src = [src_names[v % ns] for v in pair_vals.tolist()]
        if cfg.bucket_by == "source":
            # A source belongs to one domain; should one span several, the bigger part names it.
            by_src: dict[str, tuple[int, str]] = {}
            for d, s, c in zip(pair_dom, pair_src, pair_counts.tolist()):
                if c > by_src.get(s, (-1, ""))[0]:
                    by_src[s] = (c, d)
            names = sorted(by_src)
            pos = {s: i for i, s in enumerate(names)}
            remap = np.array([pos[s] for s in pair_src], dtype=np.int32)
            domains = [by_src[s][1] for s in names]
        else:
            labels = [f"{d}/{s}" for d, s in zip(pair_dom, pair_src)]
            domain_of = dict(zip(labels, pair_dom))
            names = sorted(labels)
            pos = {s: i for i, s in enumerate(names)}
            remap = np.array([pos[s] for s in labels], dtype=np.int32)
            domains = [domain_of[nm] for nm in names]
        row_bucket = remap[pair_id] if n else np.zeros(0, np.int32)
        del pair_id
    else:
        present = np.flatnonzero(np.bincount(dom, minlength=len(dom_names))) if n else np.zeros(0, np.int64)
        names = sorted(dom_names[i] for i in present.tolist())
        pos = {s: i for i, s in enumerate(names)}
        remap = np.array([pos.get(d, -1) for d in dom_names], dtype=np.int32)
        if np.array_equal(remap, np.arange(len(dom_names))):
            row_bucket = dom  # dictionary already in bucket order: no copy
        else:
            row_bucket = remap[dom] if n else np.zeros(0, np.int32)
        domains = list(names)
    del dom

    cls, cls_names = _codes(table["class_name"])
    width = len(cls_names) + 1  # slot 0 = unlabeled
    kt = np.int32 if len(names) * width < 2**31 else np.int64
    key = row_bucket.astype(kt) * kt(width)
    key += cls
    key += 1
    del cls
    values, counts, row_class = _group_codes(key, len(names) * width)
    del key
    class_bucket = values // width
    class_label = values % width - 1
    class_names = [cls_names[i] if i >= 0 else None for i in class_label.tolist()]
    return Pool(n, row_bucket.astype(np.int32, copy=False), row_class, list(names), domains,
                class_bucket.astype(np.int64), class_names, counts.astype(np.int64))


def _add_empty_buckets(pool: Pool, names: list[str], domains: list[str]) -> Pool:
    """Buckets named by the targets that have no rows (they show up as infeasible, not as errors)."""
    new = [(nm, d) for nm, d in zip(names, domains) if nm not in pool.bucket_names]
    if not new:
        return pool
    all_names = pool.bucket_names + [nm for nm, _ in new]
    all_domains = pool.bucket_domain + [d for _, d in new]
    order = sorted(range(len(all_names)), key=lambda i: all_names[i])
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    old_rank = rank[: len(pool.bucket_names)]
    row_bucket = old_rank[pool.row_bucket] if pool.n_rows else pool.row_bucket
    class_bucket = old_rank[pool.class_bucket].astype(np.int64) if len(pool.class_bucket) else pool.class_bucket
    # Classes must stay grouped by bucket in bucket order: re-sort them (few classes, cheap).
    corder = np.argsort(class_bucket, kind="stable")
    crank = np.empty(len(corder), np.int32)
    crank[corder] = np.arange(len(corder), dtype=np.int32)
    return Pool(
        pool.n_rows, row_bucket.astype(np.int32), crank[pool.row_class] if pool.n_rows else pool.row_class,
        [all_names[i] for i in order], [all_domains[i] for i in order], class_bucket[corder],
        [pool.class_names[i] for i in corder.tolist()], pool.class_size[corder],
    )


# ----------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------


def _class_capacity(pool: Pool, cfg: MixConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(temperature weight, capacity with repeats, capacity without repeats) per class."""
    n = pool.class_size
    unl = pool.unlabeled
    t = cfg.class_cap if cfg.class_cap is not None else np.iinfo(np.int64).max // 4
    r = cfg.max_repeats
    # Unlabeled rows are classes of one: each may take min(cap, repeats) copies.
    cap = np.where(unl, n * min(t, r), np.minimum(t, n * r)).astype(np.int64)
    cap1 = np.where(unl, n, np.minimum(t, n)).astype(np.int64)
    weight = np.where(unl, n.astype(np.float64), n.astype(np.float64) ** (1.0 / cfg.class_temperature))
    return weight, cap, cap1


def target_shares(pool_names: list[str], pool_domains: list[str], cap1: np.ndarray,
                  cfg: MixConfig) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Target share per bucket from the config, and empty buckets the targets name.

    Returns:
        ({bucket: share} over every bucket with a share, [(empty bucket name, its domain)]).
    """
    cap_of = dict(zip(pool_names, cap1.tolist()))
    # Level 1: groups are domains (bucket_by: domain) or sources (bucket_by: source).
    groups: dict[str, list[str]] = {}
    group_domain: dict[str, str] = {}
    for nm, d in zip(pool_names, pool_domains):
        g = d if cfg.bucket_by == "domain" else nm
        groups.setdefault(g, []).append(nm)
        group_domain[g] = d
    gnames = sorted(groups)
    gcap = np.array([sum(cap_of[b] for b in groups[g]) for g in gnames], dtype=np.float64)
    empty: list[tuple[str, str]] = []
    level1: dict[str, float] = {}
    if cfg.shares is not None:
        level1 = {g: float(s) for g, s in cfg.shares.items()}
    elif cfg.general_share is not None:
        gs = float(cfg.general_share)
        for side, share in ((True, gs), (False, 1.0 - gs)):
            members = [i for i, g in enumerate(gnames) if (group_domain[g] == GENERAL) == side]
            if not members:
                if share > 0:
                    level1[GENERAL if side else "(domain data)"] = share
                continue
            fr = split_weights(cfg.domain_split, gcap[members], cfg.split_temperature)
            for i, f in zip(members, fr.tolist()):
                level1[gnames[i]] = share * f
    else:
        fr = split_weights("proportional", gcap, 1.0)
        level1 = {g: f for g, f in zip(gnames, fr.tolist())}
    # Level 2: a group's share goes to its buckets (one, or one per source with source_split).
    shares: dict[str, float] = {}
    for g, s in level1.items():
        members = groups.get(g)
        if not members:
            empty.append((g, g if cfg.bucket_by == "domain" or g == "(domain data)" else "(no rows)"))
            shares[g] = s
            continue
        if len(members) == 1:
            shares[members[0]] = s
            continue
        fr = split_weights(cfg.source_split or "proportional", np.array([cap_of[b] for b in members]),
                           cfg.split_temperature)
        for b, f in zip(members, fr.tolist()):
            shares[b] = s * f
    return shares, empty


def _floor(x: float) -> int:
    return int(math.floor(x * (1 + 1e-12) + _EPS))


def plan(pool: Pool, cfg: MixConfig) -> tuple[Pool, Plan]:
    """Rows per bucket and per class for ``cfg`` (see the module docstring)."""
    weight, cap, cap1 = _class_capacity(pool, cfg)
    nb = len(pool.bucket_names)
    b_cap1 = np.bincount(pool.class_bucket, weights=cap1, minlength=nb).round().astype(np.int64)
    shares_d, empty = target_shares(pool.bucket_names, pool.bucket_domain, b_cap1, cfg)
    if empty:
        pool = _add_empty_buckets(pool, [e[0] for e in empty], [e[1] for e in empty])
        weight, cap, cap1 = _class_capacity(pool, cfg)
        nb = len(pool.bucket_names)
        b_cap1 = np.bincount(pool.class_bucket, weights=cap1, minlength=nb).round().astype(np.int64)
    b_cap = np.bincount(pool.class_bucket, weights=cap, minlength=nb).round().astype(np.int64)
    s = np.array([shares_d.get(b, 0.0) for b in pool.bucket_names], dtype=np.float64)
    if s.sum() > 0:
        s = s / s.sum()
    pos = s > 0
    usable = pos & (b_cap > 0)

    # Largest total that meets every share exactly (each bucket within its capacity).
    same_shares_total = _floor(float(np.min(b_cap[pos] / s[pos]))) if pos.any() else 0
    if cfg.total is not None:
        requested = int(cfg.total)
    elif usable.any():
        # "As large as the caps allow": the bucket with the most data for its share is used once,
        # no bucket beyond its capacity with repeats.
        once = float(np.max(b_cap1[usable] / s[usable]))
        requested = _floor(min(once, float(np.min(b_cap[usable] / s[usable]))))
    else:
        requested = 0
    short = pos & (s * requested > b_cap + 1e-6)
    feasible = not short.any()

    same_total_rows = water_fill(s, b_cap, requested)
    same_shares_rows = water_fill(s, b_cap, min(same_shares_total, requested))
    closest = {
        "same_shares": _mix_summary(pool.bucket_names, same_shares_rows),
        "same_total": _mix_summary(pool.bucket_names, same_total_rows),
    }
    unmet: list[dict[str, Any]] = []
    if feasible:
        total, bucket_rows = requested, same_total_rows
    else:
        for b in np.flatnonzero(short).tolist():
            name = pool.bucket_names[b]
            in_b = pool.class_bucket == b
            n_cls = int((in_b & ~pool.unlabeled).sum())
            unmet.append({
                "constraint": "share",
                "bucket": name,
                "target_share": float(s[b]),
                "target_rows": round(float(s[b] * requested), 3),
                "max_rows": int(b_cap[b]),
                "reason": (
                    f"bucket {name!r} has {int(pool.class_size[in_b].sum())} samples ({n_cls} labelled "
                    f"class(es)); with class_cap={cfg.class_cap} and max_repeats={cfg.max_repeats} it can supply "
                    f"at most {int(b_cap[b])} rows, but {s[b]:.4%} of {requested} is {s[b] * requested:.1f}"
                    if b_cap[b] > 0 else f"bucket {name!r} has no samples in the pool"
                ),
            })
        if cfg.on_infeasible == "keep_total":
            total, bucket_rows = int(same_total_rows.sum()), same_total_rows
            if total < requested:
                unmet.append({"constraint": "total", "target_rows": requested, "max_rows": total,
                              "reason": f"all buckets together can supply only {total} rows"})
            applied = "same_total"
        else:
            total, bucket_rows = int(same_shares_rows.sum()), same_shares_rows
            unmet.append({"constraint": "total", "target_rows": requested, "max_rows": total,
                          "reason": f"{requested} rows cannot meet every share; {total} is the largest total "
                                    "that does"})
            applied = "same_shares"
        if cfg.on_infeasible == "error":  # nothing is mixed; the closest mixes are in the report
            total, bucket_rows, applied = 0, np.zeros(nb, np.int64), None
        closest["applied"] = applied

    class_rows = np.zeros(len(pool.class_size), dtype=np.int64)
    if len(class_rows):
        starts = np.searchsorted(pool.class_bucket, np.arange(nb + 1))
        for b in np.flatnonzero(bucket_rows).tolist():
            lo, hi = starts[b], starts[b + 1]
            class_rows[lo:hi] = water_fill(weight[lo:hi], cap[lo:hi], int(bucket_rows[b]))
    return pool, Plan(s, requested, int(total), feasible, bucket_rows.astype(np.int64), b_cap1, b_cap,
                      weight, cap, class_rows, unmet, closest)


def _mix_summary(names: list[str], rows: np.ndarray) -> dict[str, Any]:
    tot = int(rows.sum())
    return {
        "total": tot,
        "rows": {n: int(r) for n, r in zip(names, rows.tolist()) if r},
        "shares": {n: (r / tot if tot else 0.0) for n, r in zip(names, rows.tolist()) if r},
    }


# ----------------------------------------------------------------------------------------------
# sample repeats
# ----------------------------------------------------------------------------------------------

_BIN_BITS = 10  # draws are binned by their top bits: 1024 bins per class


def sample_repeats(pool: Pool, class_rows: np.ndarray, seed: int) -> np.ndarray:
    """Copies per input row: ``a // n`` each, plus one for ``a % n`` seeded-random rows per class.

    Every row draws a uniform 32-bit number; a class takes the ``a % n`` rows with the smallest
    draws (ties go to the earlier row). Instead of sorting all rows, draws are binned by their top
    bits, a histogram per class finds the bin holding the cut, and only the rows of that one bin
    (about 1/1024 of the class) are sorted. O(rows), int32 arrays only.
    """
    n = pool.class_size
    base = class_rows // np.maximum(n, 1)
    extra = class_rows - base * n
    rep = base.astype(np.int32)[pool.row_class]
    partial = np.flatnonzero(extra > 0)
    if len(partial) == 0:
        return rep
    n_bins = 1 << _BIN_BITS
    n_part = len(partial)
    if (n_part + 1) * n_bins >= 2**31:
        raise ValueError(f"too many partially drawn classes ({n_part}) for int32 bin keys")
    local = np.full(len(n), n_part, dtype=np.int32)  # n_part = "not drawn" pseudo class
    local[partial] = np.arange(n_part, dtype=np.int32)
    lc = local[pool.row_class]
    draw = np.random.default_rng([seed, 0x6D6978]).integers(0, 2**32, size=pool.n_rows, dtype=np.uint32)
    key = (draw >> np.uint32(32 - _BIN_BITS)).astype(np.int32)
    key += lc * np.int32(n_bins)
    hist = np.bincount(key, minlength=(n_part + 1) * n_bins).reshape(n_part + 1, n_bins)[:n_part]
    cum = np.cumsum(hist, axis=1)
    want = extra[partial]
    cut = (cum < want[:, None]).sum(axis=1)  # bin holding the want-th smallest draw
    below = np.where(cut > 0, cum[np.arange(n_part), np.maximum(cut - 1, 0)], 0)
    thr = np.full(n_part + 1, -1, dtype=np.int32)
    thr[:n_part] = np.arange(n_part, dtype=np.int32) * n_bins + cut.astype(np.int32)
    thr_row = thr[lc]
    del lc
    rep += key < thr_row
    cand = np.flatnonzero(key == thr_row)
    del thr_row, key
    # Inside the cut bin: order by (class, draw, row) and take the first want - below of each class.
    c_cls = pool.row_class[cand]
    c_loc = local[c_cls]
    order = np.lexsort((cand, draw[cand], c_loc))
    cand, c_loc = cand[order], c_loc[order]
    starts = np.searchsorted(c_loc, np.arange(n_part))
    rank = np.arange(len(cand)) - starts[c_loc]
    take = rank < (want - below)[c_loc]
    rep[cand[take]] += 1
    return rep


def capped_classes(pool: Pool, pl: Plan, cfg: MixConfig) -> np.ndarray:
    """Classes held at ``class_cap`` although they had more samples than the cap."""
    if cfg.class_cap is None:
        return np.zeros(len(pool.class_size), dtype=bool)
    return ~pool.unlabeled & (pool.class_size > cfg.class_cap) & (pl.class_rows >= cfg.class_cap)


def mix(table: pa.Table, cfg: MixConfig, seed: int) -> MixResult:
    """Encode, plan and draw the repeats of every row."""
    pool = encode(table, cfg)
    pool, pl = plan(pool, cfg)
    if not pl.feasible and cfg.on_infeasible == "error":
        reasons = "; ".join(u["reason"] for u in pl.unmet)
        raise MixInfeasibleError(f"mix targets cannot be met (on_infeasible: error): {reasons}",
                                 MixResult(pool, pl, cfg, np.zeros(pool.n_rows, np.int32)))
    repeats = sample_repeats(pool, pl.class_rows, seed) if pool.n_rows else np.zeros(0, np.int32)
    return MixResult(pool, pl, cfg, repeats)


def manifest_from(table: pa.Table, result: MixResult) -> pa.Table:
    """uid, repeats, bucket of the rows in the mix, in input order (tables.MANIFEST)."""
    keep = result.repeats > 0
    mask = pa.array(keep)
    uid = table["uid"].filter(mask)
    if uid.type != pa.string():
        uid = uid.cast(pa.string())
    names = pa.array(result.pool.bucket_names, pa.string())
    bucket = pa.DictionaryArray.from_arrays(pa.array(result.pool.row_bucket), names).filter(mask)
    reps = pa.array(result.repeats[keep])
    return pa.Table.from_arrays([uid, reps, bucket.cast(pa.string())], schema=MANIFEST)
