"""Ingest: raw samples of every source -> normalised RGB JPEGs in ``ingest/<source>/part-NNNNN.parquet``.

Every input sample becomes exactly one row: ``status=success`` with the image, or a failure status
with the reason (the run goes on). A part is the unit of parallelism and of resume.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterable, Optional

import pyarrow as pa

from . import sources
from .images import STATUS_OK, process_image
from .labels import clean_class_name
from . import layout
from .executor import Stage, Unit, UnitContext
from .recipe import Recipe, Source
from .stats import StageStats
from .store import RunStore
from .sources.select import label_rule
from .tables import EXCLUDED, INGEST

log = logging.getLogger(__name__)
STAGE = "ingest"
CODE_VERSION = "ingest-v2"  # bump when the output of a part changes for the same input


def make_uid(source: str, orig_id: str) -> str:
    """Stable sample id: the same source + original id always gives the same uid."""
    return hashlib.sha256(f"{source}\x00{orig_id}".encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _utf8_safe(text: Optional[str]) -> Optional[str]:
    """``text`` made storable as UTF-8 (None stays None).

    Non-UTF-8 file names arrive as surrogate escapes, which Arrow refuses; their bytes are kept visible
    as ``\\xNN``. The uid is still made from the original name.
    """
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        return text.encode("utf-8", "replace").decode("utf-8")


def plan(recipe: Recipe, store: RunStore, names: Optional[Iterable[str]] = None) -> list[sources.PartSpec]:
    """List the parts of every source (or of ``names``). Raises SourceError for a source that cannot be read."""
    parts: list[sources.PartSpec] = []
    spool = store.path(layout.INGEST_SPOOL)
    for src in recipe.sources:
        if names is not None and src.name not in names:
            continue
        parts += sources.plan(src, recipe.ingest.part_size, spool, recipe.seed)
    return parts


def process_part(src: Source, part: sources.PartSpec, image_size: int, quality: int,
                 max_pixels: int) -> tuple[pa.Table, StageStats, pa.Table]:
    """Decode, normalise and describe every sample of one part. Pure: no run-store access.

    Returns the part's rows, its stats and its excluded rows (tables.EXCLUDED): rows the recipe's
    label filters drop, whether the planner set them aside or they are found as the part is read.
    """
    stats = StageStats(STAGE)
    cols: dict[str, list] = {f.name: [] for f in INGEST}
    excl: dict[str, list] = {f.name: [] for f in EXCLUDED}
    synthetic = src.kind == "synthetic"
    seen: set[str] = set()
    rule = label_rule(src)

    def exclude(oid: str, reason: str, detail: str) -> None:
        stats.drop(reason, example=f"{src.name}:{_utf8_safe(oid)}: {detail}")
        excl["uid"].append(make_uid(src.name, oid))
        excl["source"].append(src.name)
        excl["stage"].append(STAGE)
        excl["drop_reason"].append(reason)
        excl["detail"].append(_utf8_safe(detail))

    for oid, _label, reason, detail in part.args.get("excluded") or []:
        stats.total += 1
        seen.add(oid)
        exclude(oid, reason, detail)
    for raw in sources.read(part):
        stats.total += 1
        oid = raw.orig_id
        if oid in seen:  # the same id twice in one source would give the same uid twice
            oid = f"{oid}#dup{stats.total}"
        seen.add(oid)
        why = rule(raw.label)
        if why:  # sources whose labels are only known as they are read (tars, streams, URL lists)
            exclude(oid, *why)
            continue
        label = raw.label
        if label is not None:
            try:
                label.encode("utf-8")
            except UnicodeEncodeError:
                label = label.encode("utf-8", "replace").decode("utf-8")
        if raw.error is not None:
            status = "failed_to_download" if raw.error.startswith("failed_to_download") else "failed_to_read"
            res = None
            err = _utf8_safe(raw.error)
        else:
            res = process_image(raw.data, image_size, quality, max_pixels)
            status, err = res.status, res.error
        if status == STATUS_OK and label is None and raw.caption is None:
            status, err = "failed_no_label", "sample has neither a label nor a caption"
        ok = status == STATUS_OK
        if ok:
            stats.kept += 1
        else:
            stats.drop(status, example=f"{src.name}:{_utf8_safe(oid)}: {err}")
        cols["uid"].append(make_uid(src.name, oid))
        cols["source"].append(src.name)
        cols["domain"].append(src.domain)
        cols["role"].append(src.role)
        cols["label"].append(label)
        cols["class_name"].append(clean_class_name(label, src.class_names) if label is not None else None)
        cols["orig_id"].append(_utf8_safe(oid))
        cols["image"].append(res.jpeg if ok and res else None)
        cols["width"].append(res.width if ok and res else None)
        cols["height"].append(res.height if ok and res else None)
        cols["orig_width"].append(res.orig_width if res else None)
        cols["orig_height"].append(res.orig_height if res else None)
        cols["sha256"].append(res.sha256 if ok and res else None)
        cols["caption"].append(raw.caption)
        cols["licence"].append(src.licence)
        cols["synthetic"].append(synthetic)
        cols["status"].append(status)
        cols["error"].append(err)
    stats.add("bytes_out", sum(len(b) for b in cols["image"] if b))
    return pa.table(cols, schema=INGEST), stats, pa.table(excl, schema=EXCLUDED)


class IngestStage(Stage):
    """One unit per part of every source; the part's reader spec and the decode settings are its config."""

    name = STAGE
    cpu_bound = True

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        ing = recipe.ingest
        return [Unit(layout.source_unit(p.source, p.part), payload=p,
                     config={"part": [CODE_VERSION, p.fingerprint, recipe.image_size, ing.jpeg_quality,
                                      ing.max_image_pixels]})
                for p in plan(recipe, store)]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        part: sources.PartSpec = unit.payload
        r = ctx.recipe
        table, stats, excluded = process_part(r.source(part.source), part, r.image_size, r.ingest.jpeg_quality,
                                              r.ingest.max_image_pixels)
        ctx.stats = ctx.stats.merge(stats)
        ctx.write_parquet(layout.ingest_part(part.source, part.part), table)
        if excluded.num_rows:
            ctx.exclude(excluded)
        ctx.info["rows"] = table.num_rows


def ingested_parts(store: RunStore, recipe: Recipe, role: Optional[str] = None) -> list[tuple[str, int]]:
    """(source, part index) of every ingested part of the recipe's sources (or of ``role``), in recipe order."""
    out = []
    for src in recipe.sources:
        if role is None or src.role == role:
            d = store.path(layout.INGEST, src.name)
            if d.is_dir():
                out += [(src.name, layout.part_index(p.name)) for p in sorted(d.glob("part-*.parquet"))]
    return out
