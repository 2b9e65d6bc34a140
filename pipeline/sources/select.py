"""Per-source label control and sampling, shared by every planner that knows its rows' labels.

A source's ``include_labels`` / ``exclude_labels`` / ``class_names`` name raw labels; each name is
checked against the labels the source really has (a name that matches none is an error with the
closest real labels). Rows dropped by a label filter are not lost: they travel with a part and the
ingest unit files them under ``excluded/ingest/`` with their reason. ``max_samples`` then keeps the
first N remaining rows or, with ``sample: stratified``, N rows spread over the classes in proportion
to their counts, chosen by a hash of (seed, row id) so the choice is deterministic and stable.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from .base import SourceError

REASON_EXCLUDED = "label_excluded"
REASON_NOT_INCLUDED = "label_not_included"


@dataclass
class Entry:
    """One row of a source as a planner sees it: where it is, its id and its raw label (None: unknown)."""

    ref: Any
    orig_id: str
    label: Optional[str]


@dataclass
class Excluded:
    entry: Entry
    reason: str
    detail: str


def closest(name: str, labels: Iterable[str], n: int = 3) -> list[str]:
    """Real labels most like ``name``: labels containing it (case-insensitive) first, then difflib's best."""
    labels = sorted(set(labels))
    low = name.lower()
    contains = [lab for lab in labels if low in lab.lower() or lab.lower() in low]
    fuzzy = difflib.get_close_matches(name, labels, n=n, cutoff=0.5)
    fuzzy += difflib.get_close_matches(low, [lab.lower() for lab in labels], n=n, cutoff=0.5)
    lower_to_label = {lab.lower(): lab for lab in labels}
    out: list[str] = []
    for lab in contains + fuzzy:
        lab = lower_to_label.get(lab, lab)
        if lab not in out:
            out.append(lab)
    return out[:n]


def label_name_problems(src: Any, labels: Iterable[str]) -> list[str]:
    """Every recipe label name (include/exclude/class_names) of ``src`` that matches none of ``labels``."""
    known = set(labels)
    problems = []
    for key, names in (("include_labels", src.include_labels or []), ("exclude_labels", src.exclude_labels),
                       ("class_names", list(src.class_names))):
        for name in names:
            if name not in known:
                near = closest(name, known)
                hint = f"closest real labels: {near}" if near else f"its labels are {sorted(known)[:12]}"
                problems.append(f"{key} names {name!r}, which is not a label of this source ({hint})")
    return problems


def check_label_names(src: Any, labels: Iterable[str]) -> None:
    problems = label_name_problems(src, labels)
    if problems:
        raise SourceError(f"source {src.name!r}: " + "; ".join(problems))


def label_rule(src: Any) -> Callable[[Optional[str]], Optional[tuple[str, str]]]:
    """label -> (reason, detail) when the recipe drops that label, else None."""
    include = set(src.include_labels) if src.include_labels is not None else None
    exclude = set(src.exclude_labels)

    def rule(label: Optional[str]) -> Optional[tuple[str, str]]:
        if label is None:
            return None  # captioned rows (general data) carry no label to filter on
        if label in exclude:
            return REASON_EXCLUDED, f"label {label!r} is in exclude_labels"
        if include is not None and label not in include:
            return REASON_NOT_INCLUDED, f"label {label!r} is not in include_labels"
        return None

    return rule


def has_label_filter(src: Any) -> bool:
    return src.include_labels is not None or bool(src.exclude_labels)


def _rank(seed: int, orig_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{orig_id}".encode("utf-8", "surrogatepass")).hexdigest()


def _quotas(counts: dict[Optional[str], int], n: int) -> dict[Optional[str], int]:
    """Split ``n`` over classes in proportion to their counts (largest remainder, ties by class name)."""
    total = sum(counts.values())
    if n >= total:
        return dict(counts)
    exact = {c: n * k / total for c, k in counts.items()}
    q = {c: min(counts[c], int(v)) for c, v in exact.items()}
    left = n - sum(q.values())
    order = sorted(counts, key=lambda c: (-(exact[c] - int(exact[c])), str(c)))
    while left > 0:
        progressed = False
        for c in order:
            if left and q[c] < counts[c]:
                q[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return q


def select(entries: Sequence[Entry], src: Any, seed: int) -> tuple[list[Entry], list[Excluded]]:
    """Apply the label filters, then ``max_samples`` as ``src.sample`` says. Kept rows stay in source order."""
    rule = label_rule(src)
    kept: list[Entry] = []
    excluded: list[Excluded] = []
    for e in entries:
        why = rule(e.label)
        if why:
            excluded.append(Excluded(e, *why))
        else:
            kept.append(e)
    n = src.max_samples
    if n and len(kept) > n:
        if src.sample == "stratified":
            by_class: dict[Optional[str], list[int]] = {}
            for i, e in enumerate(kept):
                by_class.setdefault(e.label, []).append(i)
            quotas = _quotas({c: len(ix) for c, ix in by_class.items()}, n)
            chosen: set[int] = set()
            for c, ix in by_class.items():
                chosen.update(sorted(ix, key=lambda i: _rank(seed, kept[i].orig_id))[: quotas[c]])
            kept = [e for i, e in enumerate(kept) if i in chosen]
        else:
            kept = kept[:n]
    return kept, excluded


def chunk(entries: Sequence[Entry], kept: Sequence[Entry], excluded: Sequence[Excluded],
          part_size: int) -> list[tuple[list[Entry], list[Excluded]]]:
    """Cut kept rows into parts of ``part_size``; each excluded row rides with the part its position falls in."""
    if not kept:
        return []
    pos = {id(e): i for i, e in enumerate(entries)}
    parts = [(list(kept[i: i + part_size]), []) for i in range(0, len(kept), part_size)]
    ends = [pos[id(p[0][-1])] for p in parts]
    j = 0
    for x in sorted(excluded, key=lambda x: pos[id(x.entry)]):
        while j < len(parts) - 1 and pos[id(x.entry)] > ends[j]:
            j += 1
        parts[j][1].append(x)
    return parts


def excluded_args(excluded: Sequence[Excluded]) -> list[list[Optional[str]]]:
    """Excluded rows as plain lists (picklable, hashable into a part fingerprint)."""
    return [[x.entry.orig_id, x.entry.label, x.reason, x.detail] for x in excluded]


def require_rows(src: Any, kept: Sequence[Entry], excluded: Sequence[Excluded], where: str) -> None:
    if not kept:
        why = f" (all {len(excluded)} rows dropped by the label filters)" if excluded else ""
        raise SourceError(f"source {src.name!r}: {where} leaves no rows to ingest{why}; "
                          "fix include_labels/exclude_labels or the source's path/split")
