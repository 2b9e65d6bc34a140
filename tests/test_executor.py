"""The stage executor: what runs, what is skipped, and why, over toy stages and the real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import layout
from pipeline.executor import Executor, Stage, Unit, UnitContext, drive, run_stages
from pipeline.recipe import parse_recipe
from pipeline.stages import STAGE_NAMES
from pipeline.store import RunStore


# ----------------------------------------------------------------------------- toy stages
class Letters(Stage):
    """Units a0..aN each write one file whose text comes from the config (so a config change changes it)."""

    name = "letters"

    def __init__(self, n: int = 2, text: str = "x", fail: bool = False, partial: bool = False):
        self.n, self.text, self.fail, self.partial = n, text, fail, partial
        self.calls: list[str] = []

    def units(self, recipe, store):
        return [Unit(f"a{i}", config={"text": self.text}, payload=i) for i in range(self.n)]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        self.calls.append(unit.name)
        if self.fail:
            raise RuntimeError("boom")
        ctx.write_bytes(f"letters/{unit.name}.txt", f"{self.text}{unit.payload}".encode())
        ctx.stats.total = ctx.stats.kept = 1
        if self.partial:
            ctx.mark_incomplete("one request failed")


class Joined(Stage):
    """One unit reading every letters file (its inputs) and writing their concatenation."""

    name = "joined"

    def __init__(self):
        self.calls = 0

    def units(self, recipe, store):
        files = sorted(p.relative_to(store.root).as_posix() for p in store.path("letters").glob("*.txt"))
        return [Unit("all", inputs=tuple(files))]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        self.calls += 1
        ctx.write_bytes("joined/all.txt", b"|".join(ctx.path(f).read_bytes() for f in unit.inputs))


def _recipe():
    return parse_recipe({"name": "toy", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops",
                                                      "classes": ["a"]}]})


def _run(store: RunStore, letters: Stage, joined: Joined) -> dict:
    return drive(Executor(_recipe(), store, [letters, joined]))


def _pending(reports: dict) -> dict[str, list[str]]:
    return {k: [u.name for u in v.plan.pending] for k, v in reports.items()}


def test_done_units_skip_and_a_missing_output_reruns_only_its_unit(tmp_path):
    store = RunStore(tmp_path)
    letters, joined = Letters(), Joined()
    assert _pending(_run(store, letters, joined)) == {"letters": ["a0", "a1"], "joined": ["all"]}
    assert _pending(_run(store, letters, joined)) == {"letters": [], "joined": []}
    (tmp_path / "letters" / "a1.txt").unlink()
    reps = _run(store, letters, joined)
    # a1 is rewritten with the same bytes: its reader has nothing to redo.
    assert _pending(reps) == {"letters": ["a1"], "joined": []}
    assert "output missing" in reps["letters"].plan.pending[0].reason
    assert (tmp_path / "joined" / "all.txt").read_bytes() == b"x0|x1"


def test_truncated_or_edited_output_reruns_and_downstream_follows_content(tmp_path):
    store = RunStore(tmp_path)
    letters, joined = Letters(), Joined()
    _run(store, letters, joined)
    (tmp_path / "joined" / "all.txt").write_bytes(b"x0")  # truncated by hand
    assert _pending(_run(store, letters, joined)) == {"letters": [], "joined": ["all"]}
    assert (tmp_path / "joined" / "all.txt").read_bytes() == b"x0|x1"
    # New config for letters: new bytes, so the reader reruns too (chained on content, not on markers).
    reps = _run(store, Letters(text="y"), joined)
    assert _pending(reps) == {"letters": ["a0", "a1"], "joined": ["all"]}
    assert "settings changed" in reps["letters"].plan.pending[0].reason
    assert "input changed" in reps["joined"].plan.pending[0].reason
    assert (tmp_path / "joined" / "all.txt").read_bytes() == b"y0|y1"


def test_touched_file_with_same_content_is_not_redone(tmp_path):
    import os

    store = RunStore(tmp_path)
    letters, joined = Letters(), Joined()
    _run(store, letters, joined)
    p = tmp_path / "letters" / "a0.txt"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert _pending(_run(store, letters, joined)) == {"letters": [], "joined": []}


def test_failed_unit_leaves_no_marker_and_partial_unit_reruns(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        _run(store, Letters(fail=True), Joined())
    assert not store.path(layout.marker("letters", "a0")).exists()
    partial = Letters(partial=True)
    _run(store, partial, Joined())
    marker = json.loads(store.path(layout.marker("letters", "a0")).read_text())
    assert marker["complete"] is False and marker["outputs"]  # the outputs are usable, not final
    reps = _run(store, Letters(), Joined())
    assert _pending(reps)["letters"] == ["a0", "a1"] and "incomplete" in reps["letters"].plan.pending[0].reason
    assert _pending(_run(store, Letters(), Joined())) == {"letters": [], "joined": []}


def test_units_that_no_longer_exist_are_pruned_with_their_outputs(tmp_path):
    store = RunStore(tmp_path)
    _run(store, Letters(n=3), Joined())
    assert (tmp_path / "letters" / "a2.txt").exists()
    reps = _run(store, Letters(n=2), Joined())
    assert reps["letters"].plan.pruned == 1
    assert not (tmp_path / "letters" / "a2.txt").exists()
    assert not store.path(layout.marker("letters", "a2")).exists()
    assert (tmp_path / "joined" / "all.txt").read_bytes() == b"x0|x1"


def test_stats_of_skipped_units_come_from_their_markers(tmp_path):
    store = RunStore(tmp_path)
    first = _run(store, Letters(), Joined())
    again = _run(store, Letters(), Joined())
    assert again["letters"].stats.total == first["letters"].stats.total == 2
    assert store.read_stats("letters").kept == 2


# ----------------------------------------------------------------------------- the real pipeline
def _pipeline_recipe(tmp: Path, tiny_clip_dir: Path):
    classes = ["tomato late blight", "apple scab", "corn common rust"]
    return parse_recipe({
        "name": "exec", "seed": 1, "image_size": 64,
        "sources": [
            {"name": "leaves", "kind": "synthetic", "domain": "crops", "classes": classes, "per_class": 8,
             "size": 64},
            {"name": "cattle", "kind": "synthetic", "domain": "livestock", "classes": ["jersey cattle", "merino sheep"],
             "per_class": 8, "size": 64},
            {"name": "web", "kind": "synthetic", "domain": "general", "captioned": True, "classes": ["red car"],
             "per_class": 8, "size": 64},
            {"name": "held", "kind": "synthetic", "domain": "crops", "role": "eval", "classes": classes, "per_class": 2,
             "size": 64, "seed": 9},
        ],
        "ingest": {"part_size": 10, "processes": 1},
        "score": {"model": str(tiny_clip_dir), "min_score": None, "dedup": {"exact": True, "near_cosine": None},
                  "decontaminate": False},
        "mix": {"shares": {"crops": 0.5, "livestock": 0.25, "general": 0.25}, "max_repeats": 2},
        "write": {"samples_per_shard": 16, "formats": ["webdataset", "hf"]},
        "train": {"enabled": True, "model": str(tiny_clip_dir), "batch_size": 8, "epochs": 1, "warmup_steps": 1},
        "eval": {"enabled": True, "classifiers": ["template"]},
    })


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("exec")
    recipe = _pipeline_recipe(root, tiny_clip_dir)
    store = RunStore(root / "run")
    reports = run_stages(recipe, store)
    assert list(reports) == list(STAGE_NAMES)
    return recipe, store


def test_rerun_of_a_finished_pipeline_runs_nothing(finished, tmp_path):
    recipe, store = finished
    copy = RunStore(tmp_path / "run")
    shutil.copytree(store.root, copy.root)  # copy2 keeps mtimes; the content decides anyway
    reports = run_stages(recipe, copy)
    assert {k: len(v.plan.pending) for k, v in reports.items()} == {k: 0 for k in STAGE_NAMES}


# Deterministic outputs come back byte for byte; train metrics and the report carry timings, eval
# results name the models by absolute path (the copy lives elsewhere).
_NOT_BYTE_STABLE = {"train", "eval", "report"}


@pytest.mark.parametrize("damage", ["delete", "truncate"])
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_stage_redoes_a_deleted_or_truncated_output(finished, tmp_path, stage, damage):
    recipe, store = finished
    copy = RunStore(tmp_path / "run")
    shutil.copytree(store.root, copy.root)
    markers = sorted(copy.path(layout.DONE, stage).rglob("*.json"))
    marker = json.loads(markers[len(markers) // 2].read_text())
    rel = sorted(marker["outputs"])[len(marker["outputs"]) // 2]
    target = copy.path(rel)
    original = target.read_bytes()
    if damage == "delete":
        target.unlink()
    else:
        target.write_bytes(original[: len(original) // 2])
    reports = run_stages(recipe, copy)
    assert marker["unit"] in [u.name for u in reports[stage].plan.pending]
    assert _files(copy.path("shards")) == _files(store.path("shards"))  # the shards, byte for byte
    assert target.is_file()
    if stage not in _NOT_BYTE_STABLE:
        assert target.read_bytes() == original, rel


def test_only_transient_errors_are_retried():
    import errno
    from concurrent.futures.process import BrokenProcessPool

    from pipeline.executor import is_transient

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(BrokenProcessPool())
    assert is_transient(OSError(errno.EIO, "i/o error"))
    assert not is_transient(OSError(errno.ENOSPC, "no space left", "x"))
    assert not is_transient(ValueError("bad recipe")) and not is_transient(FileNotFoundError("gone"))


def test_outputs_are_readable_by_others_unless_the_umask_says_otherwise(tmp_path):
    import os

    from pipeline.store import write_bytes_atomic

    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a.bin", b"x")
        os.umask(0o077)
        write_bytes_atomic(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o600


def test_stages_declare_what_a_task_uses():
    from pipeline.stages import STAGES

    r = parse_recipe({"name": "r", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops", "classes": ["a"]}],
                      "score": {"device": "auto"}, "train": {"device": "cuda"}})
    res = {s.name: s.resources(r, 4, False) for s in STAGES}
    assert res["ingest"] == {"num_cpus": 1} and res["score"] == {"num_cpus": 4} and res["filter"] == {"num_cpus": 4}
    assert res["train"] == {"num_cpus": 1, "num_gpus": 1}  # asked for CUDA: a GPU, whatever the cluster has
    assert {s.name: s.resources(r, 4, True) for s in STAGES}["score"] == {"num_cpus": 1, "num_gpus": 1}
    cpu = r.model_copy(update={"score": r.score.model_copy(update={"device": "cpu"})})
    assert STAGES[3].resources(cpu, 4, True) == {"num_cpus": 4}


def test_object_store_urls_are_refused_clearly_and_file_urls_are_local(tmp_path):
    from pipeline.store import RunStore

    for url in ("s3://bucket/run", Path("s3://bucket/run"), "gs://b/r"):
        with pytest.raises(ValueError, match="object-store URLs are not supported"):
            RunStore(url)
    assert RunStore(f"file://{tmp_path}/run").root == (tmp_path / "run").resolve()
