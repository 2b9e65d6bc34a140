"""Source inspection: what each source of a recipe really holds, and what would fail, before any heavy work.

:func:`inspect_source` opens one source cheaply (dataset metadata and parquet footers of an hf
source, a folder listing, the tar headers of the first shard) and reports the detected
image/label/caption columns, the label names (with counts where a scan of the label column or
the listing gives them), the licence, which labels the recipe keeps, drops and renames, and every
problem found. :func:`preflight` runs it over all sources in parallel and raises one
:class:`SourceError` listing every bad source; ``alive build`` calls it first.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..labels import clean_class_name
from ..recipe import Recipe, Source
from .base import SourceError
from .select import has_label_filter, label_name_problems, label_rule

log = logging.getLogger(__name__)
PEEK_ROWS = 64  # rows read from a stream or a tar to see its members and labels


@dataclass
class SourceReport:
    """What one source holds and what the recipe does with it (``alive sources inspect --json`` prints these)."""

    name: str
    kind: str
    where: str
    role: str
    config: Optional[str] = None
    split: Optional[str] = None
    revision: Optional[str] = None
    format: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    caption_column: Optional[str] = None
    rows: Optional[int] = None
    labels: Optional[dict[str, Optional[int]]] = None  # raw label -> count (None: names known, counts not)
    labels_from: Optional[str] = None  # features | scan | listing | peek | recipe
    licence: Optional[str] = None
    card_licence: Optional[str] = None
    keeps: dict[str, str] = field(default_factory=dict)  # raw label -> class name it gets
    drops: dict[str, str] = field(default_factory=dict)  # raw label -> reason
    renames: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _counts(values: Sequence[Any]) -> dict[str, int]:
    return dict(sorted(Counter(str(v) for v in values if v is not None).items()))


def _inspect_hf(src: Any, rep: SourceReport, scan: bool) -> None:
    from . import hf
    from .files import parquet_file

    view = hf.open_view(src, want_licence=scan)  # the card is one more Hub call
    rep.format, rep.rows, rep.card_licence = view.builder, view.num_rows, view.licence
    image_col, label_col, cl = hf.detect_columns(view.features, src)
    rep.image_column, rep.label_column, rep.caption_column = image_col, label_col, src.caption_column
    names = list(cl.names) if cl is not None else None
    if src.fixed_label is not None:
        rep.labels, rep.labels_from = {src.fixed_label: view.num_rows}, "recipe"
        return
    if not label_col:
        return
    need_scan = scan or names is None and (has_label_filter(src) or src.class_names)
    if names is not None:
        rep.labels, rep.labels_from = {n: None for n in names}, "features"
    if need_scan and view.builder == "parquet":
        vals: list[Any] = []
        for f in view.data_files:
            vals += parquet_file(f).read(columns=[label_col]).column(0).to_pylist()
        if names is not None:
            vals = [names[int(v)] if v is not None and 0 <= int(v) < len(names) else None for v in vals]
        counted = _counts(vals)
        rep.labels = {**{n: 0 for n in (names or [])}, **counted}
        rep.labels_from, rep.rows = "scan", len(vals)
    elif need_scan and view.builder == "disk":
        vals = hf._load_disk(src).data.column(label_col).to_pylist()
        rep.labels = {**{n: 0 for n in (names or [])}, **_counts([names[v] if names else v for v in vals])}
        rep.labels_from = "scan"
    elif need_scan and view.builder == "imagefolder":
        rep.labels = _counts([Path(f).parent.name for f in view.data_files])
        rep.labels_from, rep.rows = "listing", len(view.data_files)
    elif need_scan:
        from datasets import Image

        ds = hf._load_stream(src).cast_column(image_col, Image(decode=False))
        vals = [row[label_col] for row, _ in zip(ds, range(PEEK_ROWS))]
        seen = _counts([names[v] if names else v for v in vals])
        rep.labels = {**{n: None for n in (names or [])}, **seen} if names else seen
        rep.labels_from = "peek"
        rep.notes.append(f"label counts are from the first {len(vals)} rows only ({view.builder} files)")
    if view.builder not in ("parquet", "disk", "imagefolder") and src.max_samples and src.sample == "stratified":
        rep.problems.append(f"sample: stratified needs every row's label before reading; {view.builder} files do "
                            "not give it (use sample: first or a parquet copy)")


def _inspect_imagefolder(src: Any, rep: SourceReport) -> None:
    from .files import list_imagefolder

    entries = list_imagefolder(src)
    rep.format, rep.rows = "imagefolder", len(entries)
    rep.image_column, rep.label_column = "<file>", "<class folder>"
    rep.labels, rep.labels_from = _counts([e[1] for e in entries]), "listing"


def _inspect_parquet(src: Any, rep: SourceReport) -> None:
    from .files import _parquet_files, class_label_names, parquet_file

    files = _parquet_files(src.path)
    if not files:
        raise SourceError(f"no parquet files at {src.path} (fix 'path' in the recipe)")
    rep.format = f"parquet ({len(files)} files)"
    rep.image_column, rep.label_column, rep.caption_column = src.image_column, src.label_column, src.caption_column
    vals: list[Any] = []
    rows = 0
    for f in files:
        try:
            pf = parquet_file(f)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise SourceError(f"{f} is not a readable parquet file: {e}") from None
        cols = pf.schema_arrow.names
        missing = [c for c in (src.image_column, src.label_column, src.caption_column, src.id_column)
                   if c and c not in cols]
        if missing:
            raise SourceError(f"{f} has no column(s) {missing}; its columns are {cols}")
        rows += pf.metadata.num_rows
        if src.label_column:
            v = pf.read(columns=[src.label_column]).column(0).to_pylist()
            names = class_label_names(pf.schema_arrow, src.label_column)
            vals += [names[int(x)] if names and x is not None else x for x in v]
    rep.rows = rows
    if src.label_column:
        rep.labels, rep.labels_from = _counts(vals), "scan"


def _inspect_webdataset(src: Any, rep: SourceReport) -> None:
    from .wds import iter_tar_samples, present_shards

    present, missing = present_shards(src)
    rep.format = f"webdataset ({len(present)} of {len(present) + len(missing)} shards present)"
    if not present:
        raise SourceError(f"no tar shards at {src.path} (missing: {missing[:3]}); fix 'path'")
    if missing:
        rep.notes.append(f"{len(missing)} shards of the pattern are missing (first: {missing[0]}); the present ones "
                         "are used")
    rep.image_column, rep.label_column, rep.caption_column = src.image_key, src.label_key, src.caption_key
    peek = list(iter_tar_samples(present[:1], src.image_key, src.label_key, src.caption_key, PEEK_ROWS))
    bad = [s for s in peek if s.error]
    if bad and len(bad) == len(peek):
        rep.problems.append(f"the first shard {present[0]} gives no usable sample: {bad[0].error}")
    if src.label_key:
        rep.labels, rep.labels_from = _counts([s.label for s in peek]), "peek"
        if not rep.labels and not src.caption_key:
            rep.problems.append(f"no sample of {present[0]} has a {src.label_key!r} member; set label_key, or "
                                "caption_key for image-text data")
    if src.caption_key and not any(s.caption for s in peek):
        rep.problems.append(f"no sample of {present[0]} has a {src.caption_key!r} caption member (fix caption_key)")
    if src.max_samples and src.sample == "stratified":
        rep.problems.append("sample: stratified needs every sample's label before reading; tar shards do not "
                            "give it (use sample: first)")


def _inspect_urls(src: Any, rep: SourceReport) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if not Path(src.path).is_file():
        raise SourceError(f"URL list {src.path} does not exist (fix 'path' in the recipe)")
    t = pq.read_table(src.path) if src.path.endswith(".parquet") else pcsv.read_csv(src.path)
    rep.format, rep.rows = "url list", t.num_rows
    rep.image_column, rep.label_column, rep.caption_column = src.url_column, src.label_column, src.caption_column
    missing = [c for c in (src.url_column, src.label_column, src.caption_column) if c and c not in t.column_names]
    if missing:
        raise SourceError(f"{src.path} has no column(s) {missing}; its columns are {t.column_names}")
    if src.label_column:
        rep.labels, rep.labels_from = _counts(t.column(src.label_column).to_pylist()), "scan"


def _inspect_synthetic(src: Any, rep: SourceReport) -> None:
    rep.format, rep.rows = "synthetic", len(src.classes) * src.per_class
    rep.labels, rep.labels_from = {c: src.per_class for c in src.classes}, "recipe"


def _where(src: Any) -> str:
    return getattr(src, "id", None) or getattr(src, "path", None) or f"{len(src.classes)} synthetic classes"


def inspect_source(src: Source, scan: bool = True) -> SourceReport:
    """Open ``src`` cheaply and report what it holds and what the recipe does with it.

    Args:
        src: a recipe source.
        scan: count the labels (reads an hf source's label column); without it only what the
            checks need is read.
    """
    rep = SourceReport(src.name, src.kind, _where(src), src.role, getattr(src, "config", None),
                       getattr(src, "split", None), getattr(src, "revision", None), licence=src.licence)
    try:
        if src.kind == "hf":
            _inspect_hf(src, rep, scan)
        elif src.kind == "imagefolder":
            _inspect_imagefolder(src, rep)
        elif src.kind == "parquet":
            _inspect_parquet(src, rep)
        elif src.kind == "webdataset":
            _inspect_webdataset(src, rep)
        elif src.kind == "urls":
            _inspect_urls(src, rep)
        else:
            _inspect_synthetic(src, rep)
    except SourceError as e:
        rep.problems.append(str(e).removeprefix(f"source {src.name!r}: "))
        return rep
    except Exception as e:  # anything else that stops the source from opening is a problem of that source
        rep.problems.append(f"cannot open: {type(e).__name__}: {e}")
        return rep
    _judge_labels(src, rep)
    return rep


def _judge_labels(src: Any, rep: SourceReport) -> None:
    """Keeps / drops / renames from the labels found, and every recipe label name that matches none."""
    if rep.card_licence and rep.licence and rep.card_licence.lower() != rep.licence.lower():
        rep.notes.append(f"the recipe's licence {rep.licence!r} differs from the card's {rep.card_licence!r}")
    if not rep.licence and not rep.card_licence and src.kind in ("hf", "imagefolder", "parquet", "urls"):
        rep.notes.append("no licence known (set licence in the recipe): the dataset card will say 'unknown'")
    if rep.rows == 0:
        rep.problems.append(f"{rep.where} holds no rows (fix the path/split, or remove the source)")
        return
    if rep.labels is None:
        if not rep.caption_column and src.kind not in ("webdataset",):
            rep.problems.append("no label column and no caption column: nothing to caption")
        if has_label_filter(src) or src.class_names:
            rep.problems.append("include_labels/exclude_labels/class_names are set but the source has no labels")
        return
    partial = rep.labels_from == "peek"
    problems = label_name_problems(src, rep.labels)
    if partial:  # a name not among the first rows may still be further on
        rep.notes += [p + " (among the first rows read)" for p in problems]
    else:
        rep.problems += problems
    rule = label_rule(src)
    for lab in rep.labels:
        why = rule(lab)
        if why:
            rep.drops[lab] = why[0]
        else:
            rep.keeps[lab] = clean_class_name(lab, src.class_names)
    rep.renames = {k: v for k, v in src.class_names.items() if k in rep.labels}
    if not rep.keeps and not partial:
        rep.problems.append(f"the label filters keep none of its {len(rep.labels)} labels")
    counts = [v for v in rep.labels.values() if v is not None]
    if counts and rep.labels_from == "scan" and src.max_samples and src.sample == "first":
        first_run = _class_sorted(src, rep)
        if first_run:
            rep.notes.append(first_run)


def _class_sorted(src: Any, rep: SourceReport) -> Optional[str]:
    kept = {k: rep.labels[k] for k in rep.keeps if rep.labels.get(k)}
    total = sum(kept.values())
    if total > src.max_samples and len(kept) > 1:
        return (f"max_samples {src.max_samples} of {total} kept rows with sample: first keeps the rows in source "
                "order; if the rows are sorted by class, use sample: stratified")
    return None


def inspect_recipe(recipe: Recipe, names: Optional[Sequence[str]] = None, scan: bool = True,
                   workers: int = 8) -> list[SourceReport]:
    """Inspect the recipe's sources (or ``names``) in parallel; reports come back in recipe order."""
    srcs = [s for s in recipe.sources if names is None or s.name in names]
    unknown = sorted(set(names or ()) - {s.name for s in recipe.sources})
    if unknown:
        raise SourceError(f"no source named {unknown} in recipe {recipe.name!r} "
                          f"(its sources: {[s.name for s in recipe.sources]})")
    if not srcs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(srcs)))) as pool:
        return list(pool.map(lambda s: inspect_source(s, scan=scan), srcs))


def preflight(recipe: Recipe, workers: int = 8) -> list[SourceReport]:
    """Check every source before any heavy work; raise one SourceError listing every bad source."""
    reports = inspect_recipe(recipe, scan=False, workers=workers)
    bad = [r for r in reports if not r.ok]
    if bad:
        lines = [f"{len(bad)} of {len(reports)} sources cannot be built (nothing was ingested; "
                 "`alive sources inspect RECIPE` shows every source):"]
        lines += [f"  - {r.name} ({r.kind} {r.where}): " + "; ".join(r.problems) for r in bad]
        raise SourceError("\n".join(lines))
    return reports


def format_report(rep: SourceReport, max_labels: int = 40) -> str:
    """Human-readable lines for one source."""
    head = " ".join(x for x in (
        rep.name, f"[{rep.kind}{', ' + rep.role if rep.role != 'train' else ''}]", rep.where,
        f"config={rep.config}" if rep.config else "", f"split={rep.split}" if rep.split else "",
        f"revision={rep.revision}" if rep.revision else "") if x)
    lines = [f"{head}: {'ok' if rep.ok else 'FAILS'}"]
    if rep.format:
        lines.append(f"  format: {rep.format}" + (f", {rep.rows} rows" if rep.rows is not None else ""))
    if rep.image_column or rep.label_column or rep.caption_column:
        lines.append(f"  columns: image={rep.image_column or '-'} label={rep.label_column or '-'} "
                     f"caption={rep.caption_column or '-'}")
    lines.append(f"  licence: {rep.licence or '-'} (recipe), {rep.card_licence or '-'} (card)")
    if rep.labels is not None:
        shown = list(rep.labels.items())[:max_labels]
        more = f" ... (+{len(rep.labels) - max_labels})" if len(rep.labels) > max_labels else ""
        lines.append(f"  labels ({len(rep.labels)}, from {rep.labels_from}): "
                     + ", ".join(f"{k} {v}" if v is not None else k for k, v in shown) + more)
        if rep.drops:
            lines.append(f"  drops {len(rep.drops)}: " + ", ".join(f"{k} ({v})" for k, v in rep.drops.items()))
        lines.append(f"  keeps {len(rep.keeps)}: " + ", ".join(
            f"{k} -> {v}" for k, v in list(rep.keeps.items())[:max_labels])
            + (" ..." if len(rep.keeps) > max_labels else ""))
        if rep.renames:
            lines.append("  renames: " + ", ".join(f"{k} -> {v}" for k, v in rep.renames.items()))
    lines += [f"  note: {n}" for n in rep.notes]
    lines += [f"  problem: {p}" for p in rep.problems]
    return "\n".join(lines)
