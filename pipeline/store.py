"""Run store: one folder per run, atomic writes, and a guard that keeps every path inside it.

Every file is written to a temporary name in the same folder and renamed into place, so a killed
run leaves either the old file or the new one, never half of one. Names inside the folder come
from :mod:`pipeline.layout`; what is done and what reruns is :mod:`pipeline.executor`'s business.
"""

from __future__ import annotations

import json
import logging
import os
import re
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


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (other threads write files too)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


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
    # mkstemp makes 0600 files; outputs are data for others (training jobs, other uids): 0666 & ~umask.
    os.fchmod(fd, 0o666 & ~_umask())
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


# "s3://b/r" arrives as "s3://b/r" or, through a pathlib.Path, as "s3:/b/r". One-letter schemes are drives.
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/+(.*)$")


def local_root(root: str | Path) -> Path:
    """The local path of a run folder; ``file://`` URLs are local, other URLs are refused clearly.

    Raises:
        ValueError: an object-store URL (s3://, gs://, ...): the run store writes through the local
            filesystem (a mounted bucket or a shared filesystem works).
    """
    m = _URL.match(str(root))
    if m is None:
        return Path(root)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return Path("/" + rest)
    raise ValueError(f"run folder {scheme}://{rest}: object-store URLs are not supported as --out; build into a "
                     "local path, a shared filesystem, or a bucket mounted as one (s3fs/gcsfuse/mountpoint-s3), "
                     "then upload with `alive upload`")


class RunStore:
    """Paths and bookkeeping of one run folder."""

    def __init__(self, root: str | Path):
        self.root = local_root(root).resolve()

    def path(self, *parts: str) -> Path:
        """Absolute path of a run-store name (pipeline.layout) or of path parts; never outside the run."""
        p = (self.root.joinpath(*parts)).resolve()
        # Names come from recipes and labels: never let one escape the run folder.
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"path {p} escapes the run folder {self.root}")
        return p

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

    def read_stats(self, stage: str) -> StageStats:
        """A stage's stats summed over the stats files its units wrote (stats/<stage>/*.json)."""
        from .stats import load_stage_stats

        return load_stage_stats(self.path("stats"), stage)
