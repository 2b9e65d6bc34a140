"""Persistent request cache: one SQLite row per generated sample.

The key is a hash of model + messages (or prompt) + sampling params + sample index, so a killed
run resumes without asking again for anything already answered, whatever n the earlier requests
used. Each answered request is committed at once (WAL journal), so kill -9 loses at most the
requests still in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Optional

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    key TEXT PRIMARY KEY,
    text TEXT,
    finish_reason TEXT,
    meta TEXT,
    created REAL NOT NULL
)
"""


def request_key(model: str, messages: Any, sampling: dict[str, Any], sample_index: int) -> str:
    """Cache key of one sample; ``sampling`` must not contain ``n`` (a transport detail)."""
    blob = json.dumps({"model": model, "messages": messages, "sampling": sampling, "i": int(sample_index)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    """SQLite-backed sample cache; ``path=None`` keeps it in memory (a cache-less run)."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path is not None else ":memory:", isolation_level=None,
                                   check_same_thread=False)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
        self._db.execute(_SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[Optional[str], Optional[str]]]:
        """key -> (text, finish_reason) for the keys present."""
        keys = list(keys)
        out: dict[str, tuple[Optional[str], Optional[str]]] = {}
        for i in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[i:i + 500]
            q = f"SELECT key, text, finish_reason FROM samples WHERE key IN ({','.join('?' * len(chunk))})"
            for k, text, finish in self._db.execute(q, chunk):
                out[k] = (text, finish)
        return out

    def put_many(self, rows: Iterable[tuple[str, Optional[str], Optional[str], dict[str, Any]]]) -> None:
        """Insert (key, text, finish_reason, meta) rows in one transaction."""
        now = time.time()
        data = [(k, t, f, json.dumps(m, sort_keys=True), now) for k, t, f, m in rows]
        if not data:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?)", data)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def close(self) -> None:
        self._db.close()
