"""Small helpers for tests that look inside a run folder."""

from __future__ import annotations

from pathlib import Path

from pipeline.store import RunStore


def parts(store: RunStore, stage: str, source: str) -> list[Path]:
    """The part files ``<stage>/<source>/part-NNNNN.parquet`` of a run, in order."""
    d = store.path(stage, source)
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []
