"""Synthetic source: procedurally drawn images, generated inside the ingest workers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..recipe import SyntheticSource, fingerprint
from ..synthetic import caption_for, draw_image
from .base import PartSpec, RawSample


def plan(src: SyntheticSource, part_size: int, spool_dir: Path) -> list[PartSpec]:
    n = len(src.classes) * src.per_class
    if src.max_samples:
        n = min(n, src.max_samples)
    base = fingerprint(src, "synthetic-v1")
    args = {"classes": list(src.classes), "domain": src.domain, "seed": src.seed, "size": src.size,
            "captioned": src.captioned}
    return [
        PartSpec(src.name, i, "synthetic", {**args, "start": s, "stop": min(n, s + part_size)},
                 fingerprint(base, s, min(n, s + part_size)), min(n, s + part_size) - s)
        for i, s in enumerate(range(0, n, part_size))
    ]


def read(part: PartSpec) -> Iterator[RawSample]:
    a = part.args
    classes = a["classes"]
    for k in range(a["start"], a["stop"]):
        i, ci = divmod(k, len(classes))  # class-interleaved, so max_samples keeps every class
        cls = classes[ci]
        cap = caption_for(cls, ci, a["domain"], i, a["seed"]) if a["captioned"] else None
        yield RawSample(
            orig_id=f"{cls}/{i:06d}", label=cls,
            data=draw_image(cls, ci, a["domain"], i, a["seed"], a["size"]), caption=cap,
        )
