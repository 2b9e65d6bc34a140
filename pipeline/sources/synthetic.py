"""Synthetic source: procedurally drawn images, generated inside the ingest workers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..recipe import SyntheticSource, fingerprint
from ..synthetic import caption_for, draw_image
from .base import PartSpec, RawSample
from .select import Entry, check_label_names, chunk, excluded_args, require_rows, select


def plan(src: SyntheticSource, part_size: int, spool_dir: Path, seed: int = 0) -> list[PartSpec]:
    classes = list(src.classes)
    # class-interleaved, so max_samples keeps every class
    entries = [Entry(k, f"{classes[k % len(classes)]}/{k // len(classes):06d}", classes[k % len(classes)])
               for k in range(len(classes) * src.per_class)]
    check_label_names(src, set(classes))
    kept, excluded = select(entries, src, seed)
    require_rows(src, kept, excluded, "the synthetic class list")
    base = fingerprint(src, "synthetic-v2")
    args = {"classes": classes, "domain": src.domain, "seed": src.seed, "size": src.size,
            "captioned": src.captioned}
    parts = []
    for i, (ck, cx) in enumerate(chunk(entries, kept, excluded, part_size)):
        ks, ex = [e.ref for e in ck], excluded_args(cx)
        parts.append(PartSpec(src.name, i, "synthetic", {**args, "ks": ks, "excluded": ex},
                              fingerprint(base, ks, ex), len(ks)))
    return parts


def read(part: PartSpec) -> Iterator[RawSample]:
    a = part.args
    classes = a["classes"]
    for k in a["ks"]:
        i, ci = divmod(k, len(classes))
        cls = classes[ci]
        cap = caption_for(cls, ci, a["domain"], i, a["seed"]) if a["captioned"] else None
        yield RawSample(
            orig_id=f"{cls}/{i:06d}", label=cls,
            data=draw_image(cls, ci, a["domain"], i, a["seed"], a["size"]), caption=cap,
        )
