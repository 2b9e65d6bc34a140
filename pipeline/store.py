"""Run store: one folder per run, atomic writes, per-shard done markers with input fingerprints.

Every file is written to a temporary name in the same folder and renamed into place, so a killed
run leaves either the old file or the new one, never half of one. A unit of work (a shard of a
stage) is done when its marker ``done/<stage>/<unit>.json`` exists *and* records the fingerprint the
current recipe computes for it; anything else is redone.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .stats import StageStats

def _parquet_kw() -> dict[str, Any]:
    """Writer options of every run-store parquet file.

    A page index (offset index per page) lets readers seek to pages; content-defined chunking cuts pages
    where the data says, so a re-written file shares its unchanged pages with the old one and the Hub's
    deduplicating storage uploads only what changed (``datasets`` writes the same way). Both are
    deterministic: the same table gives the same bytes.
    """
    import inspect

    kw: dict[str, Any] = dict(compression="zstd", write_statistics=False, write_page_index=True)
    if "use_content_defined_chunking" in inspect.signature(pq.ParquetWriter.__init__).parameters:  # pyarrow >= 21
        kw["use_content_defined_chunking"] = True
    return kw


PARQUET_KW = _parquet_kw()
TEMP_GLOB = ".*.tmp"  # names atomic_path gives its temp files: .<dest name>.<random>.tmp
log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success fsync and rename it onto ``dest``.

    On any error the temp file is removed and ``dest`` is left untouched (a full disk included). An
    OSError that names no file (ENOSPC from a write does not) is re-raised naming ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.filename is not None:
            raise
        if e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(dest)) from e
        raise OSError(f"{e} (writing {dest})") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | Path, text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(dest: str | Path, table: pa.Table, **kw: Any) -> None:
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, **{**PARQUET_KW, **kw})


def read_parquet(path: str | Path, columns: Optional[list[str]] = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


class RunStore:
    """Paths and bookkeeping of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # ----- layout -----
    def path(self, *parts: str) -> Path:
        p = (self.root.joinpath(*parts)).resolve()
        # Names come from recipes and labels: never let one escape the run folder.
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"path {p} escapes the run folder {self.root}")
        return p

    def stage_dir(self, stage: str) -> Path:
        return self.path(stage)

    def part_path(self, stage: str, source: str, part: int, ext: str = "parquet") -> Path:
        return self.path(stage, source, f"part-{part:05d}.{ext}")

    def parts(self, stage: str, source: str) -> list[Path]:
        d = self.path(stage, source)
        return sorted(d.glob("part-*.parquet")) if d.exists() else []

    def sweep_temp(self) -> int:
        """Remove the temp files of writes that a killed run never finished; returns how many.

        A kill -9 between a temp file's creation and its rename leaves it behind (the destination is
        untouched). Call only while no other process writes to this run folder: at the start of a build.
        """
        n = 0
        if self.root.is_dir():
            for p in sorted(self.root.rglob(TEMP_GLOB)):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
        if n:
            log.info("removed %d temp file(s) left by an interrupted run in %s", n, self.root)
        return n

    # ----- done markers -----
    def _marker(self, stage: str, unit: str) -> Path:
        return self.path("done", stage, f"{unit}.json")

    def is_done(self, stage: str, unit: str, fingerprint: str) -> bool:
        m = self._marker(stage, unit)
        if not m.exists():
            return False
        try:
            return json.loads(m.read_text()).get("fingerprint") == fingerprint
        except (OSError, json.JSONDecodeError):
            return False

    def done_fingerprint(self, stage: str, unit: str) -> Optional[str]:
        """Fingerprint recorded by a finished unit (used to chain stage fingerprints), or None."""
        m = self._marker(stage, unit)
        try:
            return json.loads(m.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            return None

    def mark_done(self, stage: str, unit: str, fingerprint: str, **info: Any) -> None:
        write_json_atomic(self._marker(stage, unit), {"fingerprint": fingerprint, **info})

    def clear_done(self, stage: str) -> None:
        d = self.path("done", stage)
        if d.exists():
            for p in d.rglob("*.json"):
                p.unlink()

    # ----- stats -----
    def write_stats(self, stats: StageStats, unit: str) -> None:
        write_json_atomic(self.path("stats", stats.stage, f"{unit}.json"), stats.to_dict())

    def read_stats(self, stage: str) -> StageStats:
        from .stats import load_stage_stats

        return load_stage_stats(self.path("stats"), stage)

    def read_unit_stats(self, stage: str, unit: str) -> StageStats:
        """Stats written by one finished unit ('source/part-00001'), or empty stats."""
        p = self.path("stats", stage, unit.replace("/", "__") + ".json")
        try:
            return StageStats.from_dict(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            return StageStats(stage)

    def write_unit_stats(self, stats: StageStats, unit: str) -> None:
        self.write_stats(stats, unit.replace("/", "__"))

    def clear_stats(self, stage: str, prefix: str = "") -> None:
        d = self.path("stats", stage)
        if d.exists():
            for p in d.glob(f"{prefix}*.json"):
                p.unlink()
