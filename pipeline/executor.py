"""The stage executor: the one owner of resume, done markers, fingerprints, stats and excluded rows.

A stage (:class:`Stage`) only declares its units, the run-store files each unit reads, its slice of
the recipe, and a processing function that writes its outputs through a :class:`UnitContext`. The
executor decides what runs:

- A unit is **done** when its marker ``done/<stage>/<unit>.json`` records the same config
  fingerprints, the same content digests of every input file, and outputs that are all still there
  unchanged (size and mtime always; the digest when those differ). Anything else reruns it.
- Inputs chain on *content*: a unit records the digest of every file it read (the digest its writer
  recorded, recomputed when the file changed since), never an upstream marker's fingerprint. A
  deleted output is rewritten by its unit; downstream reruns exactly when the new bytes differ.
- A unit that finished only partly (describe with failed classes) records its outputs but marks
  itself incomplete, so the next run retries it; its consumers see the changed digest and rerun.
- Units of a stage that no longer exist (a smaller source, fewer shards) are pruned with their
  outputs; outputs a rerun no longer produces are removed.

The flow, the CLI and the mixing-law sweep all drive :func:`drive` over :data:`pipeline.stages.STAGES`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pyarrow as pa

from . import layout
from .recipe import Recipe, fingerprint
from .stats import StageStats
from .store import RunStore, atomic_path, write_json_atomic, write_parquet_atomic

log = logging.getLogger(__name__)
MARKER_VERSION = 2


def file_digest(path: Path) -> str:
    """Content digest of a file (sha256, 32 hex chars)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


@dataclass(frozen=True)
class FileRecord:
    size: int
    mtime_ns: int
    digest: str

    @classmethod
    def of(cls, path: Path, digest: Optional[str] = None) -> "FileRecord":
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, digest or file_digest(path))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "digest": self.digest}


@dataclass(frozen=True)
class Unit:
    """One unit of work of a stage.

    Attributes:
        name: unit name, unique within the stage ("plantvillage/part-00003", "all", "00012").
        config: named parts of the recipe slice the unit's output depends on; each part gets its own
            fingerprint, so a stage can tell which part changed (score: re-decide without re-embedding).
        inputs: run-store files (layout names) the unit reads.
        payload: picklable argument for the stage's process function (a part spec, a shard number).
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    payload: Any = None


@dataclass
class PlannedUnit:
    unit: Unit
    config_fps: dict[str, str]
    input_digests: dict[str, str]
    pending: bool
    reason: str
    previous: Optional[dict[str, Any]]  # the unit's earlier marker, if any (valid JSON)

    @property
    def name(self) -> str:
        return self.unit.name


@dataclass
class StagePlan:
    stage: str
    units: list[PlannedUnit]
    pruned: int = 0

    @property
    def pending(self) -> list[PlannedUnit]:
        return [u for u in self.units if u.pending]

    @property
    def skipped(self) -> list[PlannedUnit]:
        return [u for u in self.units if not u.pending]


class Stage:
    """Base of every stage. Subclasses set ``name`` and implement :meth:`units` and :meth:`process`.

    Attributes:
        name: stage name (markers, stats, excluded rows are filed under it).
        cpu_bound: local runs send its units to a process pool (decode/resize).
    """

    name: str = ""
    cpu_bound: bool = False

    def enabled(self, recipe: Recipe) -> bool:
        return True

    def resources(self, recipe: Recipe, threads: int, gpus_available: bool) -> dict[str, float]:
        """What one unit task asks of a cluster scheduler (Ray): CPUs it keeps busy, GPUs it needs.

        Args:
            threads: the intra-op threads a torch task uses (the driver's count, for identical bits).
            gpus_available: whether the cluster has GPUs at all.
        """
        return {"num_cpus": 1}

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        raise NotImplementedError

    def process(self, unit: Unit, ctx: "UnitContext") -> None:
        raise NotImplementedError

    def prepare(self, recipe: Recipe, store: RunStore, pending: list[PlannedUnit]) -> list[Any]:
        """Scratch work items to run (mapped) before the pending units; none by default."""
        return []

    def run_prepared(self, recipe: Recipe, store: RunStore, item: Any) -> Any:
        raise NotImplementedError

    def after(self, recipe: Recipe, store: RunStore, plan: StagePlan) -> None:
        """Called once every unit of the stage is done (scratch cleanup)."""


class UnitContext:
    """What a unit's process function may touch: its recipe, inputs, outputs, stats and exclusions."""

    def __init__(self, recipe: Recipe, store: RunStore, stage: str, planned: PlannedUnit):
        self.recipe = recipe
        self.store = store
        self.stage = stage
        self.unit = planned.unit
        self.planned = planned
        self.stats = StageStats(stage)
        self.outputs: dict[str, FileRecord] = {}
        self.info: dict[str, Any] = {}
        self.complete = True
        self.incomplete_reason: Optional[str] = None

    # ----- identity
    @property
    def fingerprint(self) -> str:
        """Hash of everything the unit's output depends on: its config parts and input digests."""
        return fingerprint(self.planned.config_fps, self.planned.input_digests)

    def config_unchanged(self, part: str) -> bool:
        """Whether config part ``part`` and every input are as the previous successful run recorded,
        and its recorded outputs are intact (so a stage may reuse them: score re-decides from stored
        scores when only a threshold changed)."""
        prev = self.planned.previous
        if not prev or not prev.get("complete", False):
            return False
        if prev.get("config", {}).get(part) != self.planned.config_fps.get(part):
            return False
        if prev.get("inputs") != self.planned.input_digests:
            return False
        return all(_intact(self.store.path(rel), rec) for rel, rec in prev.get("outputs", {}).items())

    # ----- reading
    def path(self, rel: str) -> Path:
        return self.store.path(rel)

    # ----- writing (atomic; every output is recorded with its digest)
    @contextmanager
    def output(self, rel: str) -> Iterator[Path]:
        """A temp path to write ``rel`` to; renamed into place and recorded when the block ends."""
        with atomic_path(self.store.path(rel)) as tmp:
            yield tmp
        self.record(rel)

    def write_parquet(self, rel: str, table: pa.Table, **kw: Any) -> None:
        write_parquet_atomic(self.store.path(rel), table, **kw)
        self.record(rel)

    def write_json(self, rel: str, obj: Any) -> None:
        write_json_atomic(self.store.path(rel), obj)
        self.record(rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.output(rel) as tmp:
            tmp.write_bytes(data)

    def record(self, rel: str) -> None:
        """Record a file the unit placed itself (save_pretrained into a folder, say)."""
        p = self.store.path(rel)
        if not p.is_file():
            raise FileNotFoundError(f"{self.stage}/{self.unit.name}: output {p} was not written")
        self.outputs[rel] = FileRecord.of(p)

    def record_tree(self, rel_dir: str) -> None:
        root = self.store.path(rel_dir)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                self.record(p.relative_to(self.store.root).as_posix())

    def carry(self, rel: str) -> None:
        """Keep an output of the previous run as it is (checked intact by :meth:`config_unchanged`)."""
        rec = ((self.planned.previous or {}).get("outputs") or {}).get(rel)
        if rec is None:
            raise KeyError(f"{self.stage}/{self.unit.name}: {rel} is not an output of the previous run")
        self.outputs[rel] = FileRecord(rec["size"], rec["mtime_ns"], rec["digest"])

    def previous_outputs(self) -> list[str]:
        return sorted(((self.planned.previous or {}).get("outputs") or {}))

    def exclude(self, table: pa.Table) -> None:
        """The unit's dropped rows (tables.EXCLUDED), filed under excluded/<stage>/<unit>.parquet."""
        self.write_parquet(layout.excluded(self.stage, self.unit.name), table)

    def mark_incomplete(self, reason: str) -> None:
        """The outputs are usable but not final (some requests failed): the next run retries the unit."""
        self.complete = False
        self.incomplete_reason = reason


def _intact(path: Path, rec: dict[str, Any]) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != rec.get("size"):
        return False
    if st.st_mtime_ns == rec.get("mtime_ns"):
        return True
    try:  # touched or copied: the content decides
        return file_digest(path) == rec.get("digest")
    except OSError:
        return False


def _read_marker(path: Path) -> Optional[dict[str, Any]]:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("version") == MARKER_VERSION else None


class Executor:
    """Plans and runs the units of stages over one run folder."""

    def __init__(self, recipe: Recipe, store: RunStore, stages: Optional[Sequence[Stage]] = None):
        from .stages import STAGES

        self.recipe = recipe
        self.store = store
        self.stages = {s.name: s for s in (stages if stages is not None else STAGES)}
        self._index: Optional[dict[str, dict[str, Any]]] = None  # rel -> output record, loaded when needed

    def stage(self, name: str) -> Stage:
        try:
            return self.stages[name]
        except KeyError:
            raise KeyError(f"no stage named {name!r} (have {list(self.stages)})") from None

    # ----- file index: the digests writers recorded
    @property
    def index(self) -> dict[str, dict[str, Any]]:
        if self._index is None:
            self._index = {}
            self._load_index()
        return self._index

    def _load_index(self, stage: Optional[str] = None) -> None:
        if self._index is None:
            return  # loaded in full on first use
        root = self.store.path(layout.DONE) if stage is None else self.store.path(layout.DONE, stage)
        if not root.is_dir():
            return
        for p in sorted(root.rglob("*.json")):
            m = _read_marker(p)
            if m:
                self._index.update(m.get("outputs", {}))

    def digest(self, rel: str) -> str:
        """Content digest of a run-store file: the recorded one while size and mtime match, else hashed."""
        p = self.store.path(rel)
        try:
            st = p.stat()
        except OSError:
            raise FileNotFoundError(f"{p} is missing (an input of a later stage): re-run the build") from None
        rec = self.index.get(rel)
        if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return rec["digest"]
        d = file_digest(p)
        self.index[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": d}
        return d

    # ----- planning
    def plan(self, stage: Stage) -> StagePlan:
        """The stage's units with what must run and why; prunes units that no longer exist."""
        units = stage.units(self.recipe, self.store)
        names = [u.name for u in units]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"stage {stage.name}: unit {dup!r} listed twice")
        pruned = self._prune(stage.name, set(names))
        planned = [self._status(stage.name, u) for u in units]
        return StagePlan(stage.name, planned, pruned)

    def _status(self, stage: str, unit: Unit) -> PlannedUnit:
        cfg = {k: fingerprint(v) for k, v in sorted(unit.config.items())}
        digests = {rel: self.digest(rel) for rel in unit.inputs}
        prev = _read_marker(self.store.path(layout.marker(stage, unit.name)))

        def out(pending: bool, reason: str) -> PlannedUnit:
            return PlannedUnit(unit, cfg, digests, pending, reason, prev)

        if prev is None:
            return out(True, "new")
        if not prev.get("complete", False):
            return out(True, f"incomplete last time ({prev.get('incomplete_reason') or 'partial'})")
        old_cfg = prev.get("config", {})
        changed = sorted(k for k in set(cfg) | set(old_cfg) if cfg.get(k) != old_cfg.get(k))
        if changed:
            return out(True, "settings changed: " + ", ".join(changed))
        old_in = prev.get("inputs", {})
        diff = sorted(k for k in set(digests) | set(old_in) if digests.get(k) != old_in.get(k))
        if diff:
            return out(True, f"input changed: {diff[0]}" + (f" (+{len(diff) - 1})" if len(diff) > 1 else ""))
        for rel, rec in sorted(prev.get("outputs", {}).items()):
            if not _intact(self.store.path(rel), rec):
                return out(True, f"output missing or changed: {rel}")
        return out(False, "done")

    def _prune(self, stage: str, keep: set[str]) -> int:
        root = self.store.path(layout.DONE, stage)
        if not root.is_dir():
            return 0
        current: set[str] = set()
        stale: list[tuple[str, dict[str, Any]]] = []
        for p in sorted(root.rglob("*.json")):
            unit = p.relative_to(root).as_posix()[: -len(".json")]
            m = _read_marker(p) or {}
            if unit in keep:
                current.update(m.get("outputs", {}))
            else:
                stale.append((unit, m))
        for unit, m in stale:
            for rel in m.get("outputs", {}):
                if rel not in current:
                    self.store.path(rel).unlink(missing_ok=True)
                    self.index.pop(rel, None)
            self.store.path(layout.stats_file(stage, unit)).unlink(missing_ok=True)
            self.store.path(layout.marker(stage, unit)).unlink(missing_ok=True)
        if stale:
            log.info("%s: removed %d unit(s) that the recipe no longer has", stage, len(stale))
        return len(stale)

    # ----- running (in any process: workers rebuild the executor from recipe + run folder)
    def run_unit(self, stage_name: str, planned: PlannedUnit) -> StageStats:
        """Run one planned unit and write its stats and marker (last). Returns the unit's stats."""
        stage = self.stage(stage_name)
        ctx = UnitContext(self.recipe, self.store, stage_name, planned)
        t0 = time.perf_counter()
        stage.process(planned.unit, ctx)
        ctx.stats.seconds += time.perf_counter() - t0
        prev_outputs = (planned.previous or {}).get("outputs", {})
        for rel in prev_outputs:
            if rel not in ctx.outputs:  # produced last time, not any more
                self.store.path(rel).unlink(missing_ok=True)
        write_json_atomic(self.store.path(layout.stats_file(stage_name, planned.name)), ctx.stats.to_dict())
        marker = {
            "version": MARKER_VERSION, "stage": stage_name, "unit": planned.name,
            "complete": ctx.complete, "incomplete_reason": ctx.incomplete_reason,
            "config": planned.config_fps, "inputs": planned.input_digests,
            "outputs": {k: v.to_dict() for k, v in sorted(ctx.outputs.items())},
            "stats": ctx.stats.to_dict(), "info": ctx.info,
        }
        write_json_atomic(self.store.path(layout.marker(stage_name, planned.name)), marker)
        return ctx.stats

    def unit_stats(self, stage: str, unit: str) -> StageStats:
        m = _read_marker(self.store.path(layout.marker(stage, unit)))
        return StageStats.from_dict(m["stats"]) if m and "stats" in m else StageStats(stage)

    def finish(self, stage: Stage, plan: StagePlan, ran: dict[str, StageStats]) -> StageStats:
        """Merge the stats of every unit (ran now or skipped), refresh the index, run the stage's cleanup."""
        self._load_index(stage.name)
        total = StageStats(stage.name)
        for pu in plan.units:
            total = total.merge(ran[pu.name] if pu.name in ran else self.unit_stats(stage.name, pu.name))
        stage.after(self.recipe, self.store, plan)
        return total


def torch_resources(device: str, threads: int, gpus_available: bool) -> dict[str, float]:
    """Resources of a torch unit: its threads on CPU, or one GPU when ``device`` asks CUDA (or auto finds one)."""
    wants_gpu = device.startswith("cuda") or (device == "auto" and gpus_available)
    return {"num_cpus": 1, "num_gpus": 1} if wants_gpu else {"num_cpus": threads}


def is_transient(exc: BaseException) -> bool:
    """Whether a failed unit is worth retrying as it is: a dropped connection, a timeout, a lost worker.

    Bad input, bad settings and a full disk are not: a retry would fail the same way.
    """
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(exc, (ConnectionError, TimeoutError, BrokenProcessPool)):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT)


# ----------------------------------------------------------------------------- driving
# A mapper runs ``fn`` over ``items`` somewhere (in this process, on Prefect tasks, on Ray) and
# returns the results in order. ``kind`` is "prepare" or "unit"; ``stage`` says which stage.
Mapper = Callable[[Stage, str, list[Any]], list[Any]]


def local_mapper(executor: Executor) -> Mapper:
    def run(stage: Stage, kind: str, items: list[Any]) -> list[Any]:
        if kind == "prepare":
            return [stage.run_prepared(executor.recipe, executor.store, it) for it in items]
        return [executor.run_unit(stage.name, pu) for pu in items]

    return run


@dataclass
class StageReport:
    stats: StageStats
    plan: StagePlan


def drive(executor: Executor, names: Optional[Sequence[str]] = None, mapper: Optional[Mapper] = None,
          on_stage: Optional[Callable[[str, StagePlan], None]] = None) -> dict[str, StageReport]:
    """Run the enabled stages (all, or ``names``) in order: plan, prepare, map the pending units, finish.

    Args:
        executor: the run folder's executor.
        names: the stages to run, in pipeline order, whether the recipe enables them or not
            (``alive train`` on a recipe with ``train.enabled: false``); default every enabled stage.
        mapper: where units run (default: sequentially in this process).
        on_stage: called with each stage's plan before it runs (progress, logging).

    Returns:
        stage name -> its merged stats and plan, in run order.
    """
    mapper = mapper or local_mapper(executor)
    out: dict[str, StageReport] = {}
    for stage in executor.stages.values():
        if names is not None and stage.name not in names:
            continue
        if names is None and not stage.enabled(executor.recipe):  # a stage asked for by name runs
            continue
        plan = executor.plan(stage)
        if on_stage is not None:
            on_stage(stage.name, plan)
        pending = plan.pending
        for pu in pending:
            log.info("%s %s: runs (%s)", stage.name, pu.name, pu.reason)
        ran: dict[str, StageStats] = {}
        if pending:
            mapper(stage, "prepare", stage.prepare(executor.recipe, executor.store, pending))
            for pu, st in zip(pending, mapper(stage, "unit", pending)):
                ran[pu.name] = st
        out[stage.name] = StageReport(executor.finish(stage, plan, ran), plan)
    return out


def run_stages(recipe: Recipe, store: RunStore, names: Optional[Sequence[str]] = None) -> dict[str, StageReport]:
    """Run stages in this process (stage CLIs, the writer's in-process path, the mixing-law sweep)."""
    store.root.mkdir(parents=True, exist_ok=True)
    return drive(Executor(recipe, store), names)


def remove_tree(store: RunStore, rel: str) -> None:
    """Remove a scratch folder of the run (ignore a missing one)."""
    shutil.rmtree(store.path(rel), ignore_errors=True)
