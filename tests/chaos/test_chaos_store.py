"""Run-store behaviour the drill relies on: temp files of killed writes are swept, a full disk names the file."""

from __future__ import annotations

import errno
import os

import pytest

from pipeline.store import RunStore, atomic_path, write_bytes_atomic

pytestmark = pytest.mark.chaos


def test_sweep_removes_what_a_killed_write_left_and_nothing_else(tmp_path):
    store = RunStore(tmp_path)
    dest = store.path("shards", "wds", "00000.tar")
    write_bytes_atomic(dest, b"whole")
    cm = atomic_path(dest)  # a write that is killed: entered, half written, never finished
    tmp = cm.__enter__()
    tmp.write_bytes(b"ha")
    keep = [store.path("notes.tmp"), store.path("a", ".hidden"), store.path("a", "x.tmp.parquet")]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"keep")
    assert tmp.exists() and tmp.name.startswith(".00000.tar.") and tmp.name.endswith(".tmp")
    assert store.sweep_temp() == 1
    assert not tmp.exists() and dest.read_bytes() == b"whole" and all(p.exists() for p in keep)
    assert store.sweep_temp() == 0


def test_full_disk_names_the_destination_and_keeps_the_old_file(tmp_path):
    dest = tmp_path / "out" / "00001.tar"
    write_bytes_atomic(dest, b"previous")
    with pytest.raises(OSError) as e:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"part")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(dest) and str(dest) in str(e.value)
    assert dest.read_bytes() == b"previous" and sorted(os.listdir(dest.parent)) == ["00001.tar"]


def test_errors_that_name_a_file_keep_their_own_name(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        with atomic_path(tmp_path / "x.json"):
            open(tmp_path / "missing-input.txt").read()
    assert e.value.filename == str(tmp_path / "missing-input.txt")
    assert os.listdir(tmp_path) == []
