"""Hostile inputs through the whole flow (the `alive build` CLI, in process, on the session's Prefect server).

- malformed recipes: exit code 2 and a message naming the file and the key, before any work starts;
- broken or missing sources: exit code 1 and a message naming the source and the file;
- a hostile-image corpus, non-UTF-8 names and labels, and labels/ids shaped like paths ("../../etc/passwd",
  absolute paths, NUL bytes, 3000-character names): the build finishes, every input is accounted for,
  tar members and files stay inside the run folder;
- a full disk while shards are written: a clear error naming the file, nothing in place corrupted,
  and a re-run completes without rewriting the shards already written.
"""

from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from chaos_harness import (build, check_run, drill_recipe, readable_everywhere, record, results_path, shard_bytes,
                           tar_members, temp_files)
from hostile import write_hostile_folder

pytestmark = pytest.mark.chaos
MEMBER = re.compile(r"^[0-9]+\.(jpg|txt|json)$")


def _jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


def _files_outside(tmp: Path, out: Path) -> set[str]:
    """Files and folders under ``tmp`` that are neither the run folder, in it, nor one of its parents."""
    return {p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
            if out not in p.parents and p != out and p not in out.parents}


# ----------------------------------------------------------------------------- malformed recipes
BASE = {"name": "bad", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops", "classes": ["a"]}]}
MALFORMED = {
    "unknown_top_key": ({**BASE, "sourcez": []}, ["sourcez", "unknown key"]),
    "unknown_nested_key": ({**BASE, "score": {"min_scor": 0.3}}, ["score.min_scor", "unknown key"]),
    "wrong_type": ({**BASE, "image_size": "big"}, ["image_size", "integer"]),
    "wrong_type_list": ({**BASE, "sources": {"name": "s"}}, ["sources"]),
    "ratios_do_not_sum": ({**BASE, "mix": {"shares": {"crops": 0.7, "general": 0.2}}}, ["mix.shares", "sum to 1"]),
    "ratio_names_no_bucket": ({**BASE, "mix": {"shares": {"crops": 0.5, "fishery": 0.5}}}, ["fishery"]),
    "negative_ratio": ({**BASE, "mix": {"shares": {"crops": 1.5, "general": -0.5}}}, ["within [0, 1]"]),
    "no_sources": ({"name": "bad", "sources": []}, ["sources"]),
    "source_name_dotdot": ({**BASE, "sources": [{**BASE["sources"][0], "name": "../../etc"}]}, ["name", "../../etc"]),
    "source_name_absolute": ({**BASE, "sources": [{**BASE["sources"][0], "name": "/etc/passwd"}]}, ["/etc/passwd"]),
    "source_name_slash": ({**BASE, "sources": [{**BASE["sources"][0], "name": "a/b"}]}, ["a/b"]),
    "source_name_nul": ({**BASE, "sources": [{**BASE["sources"][0], "name": "a\x00b"}]}, ["sources.0"]),
    "source_name_long": ({**BASE, "sources": [{**BASE["sources"][0], "name": "a" * 300}]}, ["sources.0"]),
    "source_name_dot": ({**BASE, "sources": [{**BASE["sources"][0], "name": "."}]}, ["sources.0"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_is_refused_naming_file_and_key(tmp_path, case):
    data, needles = MALFORMED[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, text = build(recipe, tmp_path / "run")
    assert code == 2, text
    assert str(recipe) in text and "invalid recipe" in text, text
    for n in needles:
        assert n in text, (n, text)
    assert "Traceback" not in text and "UNCAUGHT" not in text
    assert not (tmp_path / "run").exists()  # refused before anything was written
    record(results_path(), {"drill": "malformed_recipe", "case": case, "exit_code": code})


@pytest.mark.parametrize("content,needle", [
    (None, "recipe file not found"),
    ("name: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    (b"name: \xff\xfe\n", "not valid YAML"),
])
def test_unreadable_recipe_file_is_refused(tmp_path, content, needle):
    recipe = tmp_path / "r.yaml"
    if content is not None:
        recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, text = build(recipe, tmp_path / "run")
    assert code == 2 and needle in text and str(recipe) in text, text
    record(results_path(), {"drill": "malformed_recipe", "case": needle.replace(" ", "_"), "exit_code": code})


# ----------------------------------------------------------------------------- broken sources
def _source_recipe(tmp: Path, src: dict) -> Path:
    r = {"name": "broken", "sources": [src], "ingest": {"processes": 1}, "score": {"enabled": False},
         "write": {"samples_per_shard": 4}}
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_broken_sources_fail_with_a_message_naming_source_and_file(tmp_path, prefect_harness):
    pq.write_table(pa.table({"image": [_jpeg(1)], "species": ["a"]}), tmp_path / "nolabel.parquet")
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (tmp_path / "emptydir").mkdir()
    cases = {
        "missing_label_column": ({"kind": "parquet", "path": str(tmp_path / "nolabel.parquet")},
                                 ["'label'", "nolabel.parquet", "species"]),
        "empty_parquet": ({"kind": "parquet", "path": str(tmp_path / "empty.parquet")}, ["empty.parquet", "no rows"]),
        "not_parquet": ({"kind": "parquet", "path": str(tmp_path / "garbage.parquet")},
                        ["garbage.parquet", "not a readable parquet"]),
        "missing_parquet": ({"kind": "parquet", "path": str(tmp_path / "nope.parquet")}, ["nope.parquet"]),
        "empty_folder": ({"kind": "imagefolder", "path": str(tmp_path / "emptydir")}, ["emptydir", "no images"]),
        "missing_folder": ({"kind": "imagefolder", "path": str(tmp_path / "missing")}, ["missing", "does not exist"]),
        "missing_tars": ({"kind": "webdataset", "path": str(tmp_path / "tars" / "{0000..0002}.tar")}, ["no tar shards"]),
    }
    for case, (src, needles) in cases.items():
        d = tmp_path / case
        d.mkdir()
        recipe = _source_recipe(d, {"name": "src-" + case.replace("_", "-"), "domain": "crops", **src})
        code, text = build(recipe, d / "run")
        record(results_path(), {"drill": "broken_source", "case": case, "exit_code": code,
                                "message": text.strip().splitlines()[-1][:200] if text.strip() else ""})
        assert code == 1, (case, text)
        assert f"src-{case.replace('_', '-')}" in text, (case, text)
        for n in needles:
            assert n in text, (case, n, text)
        assert "UNCAUGHT" not in text, (case, text)
        assert not (d / "run" / "shards").exists()


# ----------------------------------------------------------------------------- hostile data, whole flow
HOSTILE_IDS = ["../../../escaped", "/etc/shadow", "a\x00b", "y" * 3000, "ok", "..", "sub/dir/x.jpg", "./."]
HOSTILE_LABELS = [b"../../etc/passwd", b"/abs/label", b"nul\x00byte", b"x" * 3000, b"ok label", b"\xff\xfe not utf-8",
                  b"..", b"C:\\Windows\\evil"]


HOSTILE_MEMBERS = ["../../escape/a", "/abs/b", "dir/../../c", "n" * 200 + "/d"]


def _hostile_tar(path: Path) -> None:
    """A webdataset tar whose member names are paths that would escape any folder they were extracted to."""
    import tarfile

    with tarfile.open(path, "w") as tf:
        for i, key in enumerate(HOSTILE_MEMBERS):
            for ext, data in (("jpg", _jpeg(200 + i)), ("cls", f"../../label{i}".encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def test_hostile_inputs_through_the_whole_flow(tmp_path, prefect_harness, tiny_clip_dir):
    expected = write_hostile_folder(tmp_path / "imgs")
    bad = os.path.join(os.fsencode(tmp_path / "imgs"), b"bad\xff\xfename")  # a class folder that is not UTF-8
    os.makedirs(bad)
    with open(os.path.join(bad, b"img\xfe.jpg"), "wb") as f:
        f.write(_jpeg(99))
    pq.write_table(pa.table({"image": [_jpeg(i) for i in range(len(HOSTILE_IDS))],
                             "label": pa.array(HOSTILE_LABELS, pa.binary()), "id": HOSTILE_IDS}),
                   tmp_path / "hostile.parquet")
    (tmp_path / "tars").mkdir()
    _hostile_tar(tmp_path / "tars" / "0000.tar")
    out = tmp_path / "deep" / "run"
    recipe = drill_recipe(tmp_path, tiny_clip_dir, None, sources=[
        {"name": "hostile-images", "kind": "imagefolder", "domain": "crops", "path": str(tmp_path / "imgs")},
        {"name": "hostile-table", "kind": "parquet", "domain": "livestock", "path": str(tmp_path / "hostile.parquet"),
         "id_column": "id"},
        {"name": "hostile-tars", "kind": "webdataset", "domain": "fishery", "path": str(tmp_path / "tars")},
    ], mix={"max_repeats": 1}, write={"samples_per_shard": 16},
        # the corpus repeats the same files under every class folder: keep byte-duplicates so all are counted
        score={"model": str(tiny_clip_dir), "min_score": None, "dedup": {"exact": False, "near_cosine": None},
               "decontaminate": False})
    before = _files_outside(tmp_path, out)
    code, text = build(recipe, out)
    assert code == 0, text

    ing = pa.concat_tables(pq.read_table(p) for p in sorted((out / "ingest").glob("[!_]*/part-*.parquet")))
    by_source = {}
    for s, oid, st in zip(ing["source"].to_pylist(), ing["orig_id"].to_pylist(), ing["status"].to_pylist()):
        by_source.setdefault(s, {})[oid] = st
    images = by_source["hostile-images"]
    assert images.pop("bad\\xff\\xfename/img\\xfe.jpg") == "success"  # non-UTF-8 names: kept, bytes shown
    assert images == expected  # every hostile file accounted for, with its status
    assert sorted(by_source["hostile-table"]) == sorted(HOSTILE_IDS)
    assert set(by_source["hostile-table"].values()) == {"success"}
    assert sorted(by_source["hostile-tars"]) == sorted(f"0000.tar/{k}" for k in HOSTILE_MEMBERS)
    assert set(by_source["hostile-tars"].values()) == {"success"}
    labels = set(ing["label"].to_pylist())
    assert {"../../etc/passwd", "nul\x00byte", "\ufffd\ufffd not utf-8"} <= labels

    counts = check_run(out)
    n_ok = sum(1 for v in expected.values() if v == "success") + 1 + len(HOSTILE_IDS) + len(HOSTILE_MEMBERS)
    assert counts["distinct"] == n_ok  # every decodable image made it to the shards (mix keeps all, once)
    for tar in sorted((out / "shards" / "wds").glob("*.tar")):
        for m in tar_members(tar):
            assert MEMBER.match(m.name) and m.isfile(), (tar.name, m.name)
    for p in (out / "shards" / "hf" / "data").glob("*.parquet"):
        assert all(MEMBER.match(x) for x in pq.read_table(p)["image"].combine_chunks().field("path").to_pylist())
    assert _files_outside(tmp_path, out) == before  # nothing written outside the run folder
    assert not temp_files(out) and not readable_everywhere(out)
    record(results_path(), {"drill": "hostile_flow", "inputs": len(expected) + 1 + len(HOSTILE_IDS) + len(HOSTILE_MEMBERS),
                            "in_shards": counts["distinct"], "exit_code": code})


# ----------------------------------------------------------------------------- disk full
class _FullDisk:
    """``open`` for the webdataset writer: the disk is full by the time shard ``first_full`` is written.

    Shards before it are written whole; from it on, ``partial`` bytes of a tar land and then every
    write raises ENOSPC (shard tasks run concurrently, so the cut is by shard number, not by time).
    """

    def __init__(self, first_full: int, partial: int = 1500):
        self.first_full, self.partial = first_full, partial
        self.failures = 0

    def __call__(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        m = re.match(r"^\.(\d+)\.tar\.", Path(path).name)  # atomic_path's temp name: .00003.tar.<random>.tmp
        if "w" not in mode or m is None or int(m.group(1)) < self.first_full:
            return f
        outer, raw_write, room = self, f.write, [self.partial]

        def write(data):
            if len(data) > room[0]:
                raw_write(bytes(data[:room[0]]))  # a partial write lands, then the disk is full
                room[0] = 0
                outer.failures += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= len(data)
            return raw_write(data)

        f.write = write
        return f


def test_disk_full_while_writing_shards(tmp_path, prefect_harness, tiny_clip_dir, monkeypatch):
    from pipeline.write import wds as wds_writer

    recipe = drill_recipe(tmp_path, tiny_clip_dir, None, score={"enabled": False})
    out = tmp_path / "run"
    full = _FullDisk(first_full=3)
    monkeypatch.setattr(wds_writer, "open", full, raising=False)
    code, text = build(recipe, out)
    monkeypatch.undo()
    assert code == 1 and full.failures >= 1, text
    last = text.strip().splitlines()[-1]  # Prefect logs the failed task runs first
    assert last.startswith("error: [Errno 28] No space left on device") and str(out / "shards" / "wds") in last, text
    assert "UNCAUGHT" not in text, text
    assert not temp_files(out), temp_files(out)  # no partial file left behind
    assert not readable_everywhere(out)
    written = {k: v for k, v in shard_bytes(out).items() if k.endswith(".tar")}
    assert sorted(written) == ["wds/00000.tar", "wds/00001.tar", "wds/00002.tar"], sorted(written)

    code, text = build(recipe, out)
    assert code == 0, text
    after = shard_bytes(out)
    assert {k: after[k] for k in written} == written  # shards written before the failure are intact, not redone
    counts = check_run(out)
    record(results_path(), {"drill": "disk_full", "tars_before_failure": len(written), "enospc_raised": full.failures,
                            "resumed_ok": True, **counts})
