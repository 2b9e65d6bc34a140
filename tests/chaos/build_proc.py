"""`alive build` in a child process for the kill drill, optionally with slow atomic writes.

Usage: ``python tests/chaos/build_proc.py build --recipe R --out OUT --no-progress``.

With ``ALIVE_CHAOS_SLOW_WRITE=SECONDS`` every atomic write of the flow process pauses that long
between writing its temp file and renaming it into place. Nothing else changes (the bytes written
are the same); the pause only widens the windows in which a kill lands mid-write, and makes short
stages (mix, report) long enough to be hit at all. Ingest workers are separate processes and run
unpatched.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _slow_atomic_writes(delay: float) -> None:
    """Patch pipeline.store.atomic_path before any stage module imports it by name."""
    from pipeline import store

    original = store.atomic_path

    @contextmanager
    def slow_atomic_path(dest):
        with original(dest) as tmp:
            yield tmp
            time.sleep(delay)  # temp file complete, not yet renamed

    store.atomic_path = slow_atomic_path


def main() -> None:
    delay = float(os.environ.get("ALIVE_CHAOS_SLOW_WRITE") or 0)
    if delay > 0:
        _slow_atomic_writes(delay)
    from pipeline.cli import main as cli_main

    sys.argv[0] = "alive"
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
