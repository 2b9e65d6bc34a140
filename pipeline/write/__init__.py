"""Write: manifest -> webdataset shards + Hugging Face parquet layout + dataset card.

Three stages over the executor, each resumable unit by unit:

1. ``write-plan`` (one unit): expand the manifest (uid x repeats) into a global, seeded order, cut it
   into shards and write each shard's rows (captions + metadata, no images) and each ingest part's
   route (which of its images go to which shard and position). Copies of an upsampled sample sit
   at evenly spread positions, so they land in different shards.
2. ``write`` (one unit per shard): before the pending shards run, one pass per contributing ingest
   part sends its images to the shards' spool folders (a shuffle by shard: every image is read once
   whatever the order); each shard then assembles its rows and writes tar + sidecars + HF parquet.
3. ``write-index`` (one unit): sizes.json and the dataset card.

No unit reads a whole-run table per shard: a shard reads its own rows file and spool files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import layout, selection
from ..executor import PlannedUnit, Stage, StagePlan, Unit, UnitContext, remove_tree
from ..recipe import Recipe
from ..store import RunStore, write_parquet_atomic
from ..tables import MANIFEST

log = logging.getLogger(__name__)
STAGE = "write"
PLAN_STAGE = "write-plan"
INDEX_STAGE = "write-index"
CODE_VERSION = "write-v2"


def manifest(recipe: Recipe, store: RunStore) -> pa.Table:
    """The mix manifest, or every kept sample once when mixing is off."""
    if recipe.mix.enabled:
        p = store.path(layout.MANIFEST)
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run the mix stage first")
        return pq.read_table(p)
    sel = selection.load(recipe, store, kept_only=True)
    n = sel.num_rows
    return pa.table({"uid": sel["uid"], "repeats": pa.array(np.ones(n, np.int32)), "bucket": sel["domain"]},
                    schema=MANIFEST)


def _unit_hash(seed: int, uids: list[str], reps: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) per (uid, copy), stable across runs and machines."""
    out = np.empty(len(uids), np.float64)
    for i, (u, r) in enumerate(zip(uids, reps.tolist())):
        h = hashlib.blake2b(f"{seed}\x00{u}\x00{r}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2**64
    return out


def expand(man: pa.Table, seed: int) -> pa.Table:
    """(uid, repeats) -> one row per copy (uid, repeat) in the final shard order.

    Position key of copy r of a sample with R copies is (r + u) / R with u uniform: copies are spread
    evenly over the whole stream and a sample with R=1 is placed uniformly at random.
    """
    reps = man["repeats"].to_numpy()
    idx = np.repeat(np.arange(man.num_rows), reps)
    starts = np.repeat(np.cumsum(reps) - reps, reps)
    copy = np.arange(len(idx)) - starts
    uids = man["uid"].take(pa.array(idx)).to_pylist()
    u = _unit_hash(seed, uids, copy)
    keyf = (copy + u) / reps[idx]
    order = np.lexsort((np.array(uids, dtype=object).astype(str), keyf))
    return pa.table({
        "uid": pa.array([uids[i] for i in order], pa.string()),
        "repeat": pa.array(copy[order].astype(np.int32)),
        "bucket": man["bucket"].take(pa.array(idx[order])),
    })


def _part_of_uid(recipe: Recipe, store: RunStore) -> pa.Table:
    """uid -> (source, part) of every successful train sample (reads only the uid/status columns)."""
    from ..ingest import ingested_parts

    tables = []
    for s, i in ingested_parts(store, recipe, role="train"):
        t = pq.read_table(store.path(layout.ingest_part(s, i)), columns=["uid", "status"])
        t = t.filter(pc.equal(t["status"], "success")).select(["uid"])
        tables.append(t.append_column("src", pa.array([s] * t.num_rows, pa.string()))
                      .append_column("part", pa.array(np.full(t.num_rows, i, np.int32))))
    if not tables:
        return pa.table({"uid": pa.array([], pa.string()), "src": pa.array([], pa.string()),
                         "part": pa.array([], pa.int32())})
    return pa.concat_tables(tables)


def _groups(keys: list[Any]) -> dict[Any, np.ndarray]:
    """key -> row indices (ascending), for keys given per row."""
    out: dict[Any, list[int]] = {}
    for r, k in enumerate(keys):
        out.setdefault(k, []).append(r)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


class WritePlanStage(Stage):
    """The final order, cut into shards: per-shard rows files and per-part route files."""

    name = PLAN_STAGE

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        inputs = ([layout.MANIFEST] if recipe.mix.enabled else []) + selection.input_files(recipe, store)
        return [Unit("all", inputs=tuple(inputs),
                     config={"plan": [CODE_VERSION, recipe.seed, recipe.write.samples_per_shard]})]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        recipe, store = ctx.recipe, ctx.store
        man = manifest(recipe, store)
        if man.num_rows and pc.min(man["repeats"]).as_py() < 1:
            raise ValueError(f"{store.path(layout.MANIFEST)}: repeats < 1")
        order = expand(man, recipe.seed)
        sps = recipe.write.samples_per_shard
        n = order.num_rows
        n_shards = -(-n // sps) if n else 0
        pos = np.arange(n)
        order = order.append_column("pos", pa.array(pos, pa.int64()))
        order = order.append_column("shard", pa.array((pos // sps).astype(np.int32)))
        sel = selection.load(recipe, store, kept_only=True)
        ctx.write_parquet(layout.WRITE_ORDER, order)
        ctx.write_parquet(layout.WRITE_SELECTION, sel)
        # One join for the whole run, then slices: shard k is rows [k*sps, (k+1)*sps) of the order.
        rows = order.join(sel.drop_columns(["keep", "drop_reason", "score_model"]), "uid", join_type="left outer")
        rows = rows.join(_part_of_uid(recipe, store), "uid", join_type="left outer").sort_by("pos")
        lost = pc.sum(pc.is_null(rows["part"])).as_py() or 0
        if lost:
            raise RuntimeError(f"write-plan: {lost} samples of the manifest have no successful ingest row; "
                               "re-run the build (an upstream output changed under it)")
        for k in range(n_shards):
            ctx.write_parquet(layout.write_rows(k), rows.slice(k * sps, sps))
        routes = rows.select(["uid", "pos", "shard", "src", "part"])
        src, part = routes["src"].to_pylist(), routes["part"].to_pylist()
        for (s, i), idx in sorted(_groups(list(zip(src, part))).items()):
            ctx.write_parquet(layout.write_route(s, i), routes.take(pa.array(idx)).select(["uid", "pos", "shard"]))
        key_width = max(4, len(str(sps - 1)))
        ctx.write_json(layout.WRITE_PLAN, {"n_shards": n_shards, "n_samples": n, "key_width": key_width,
                                          "samples_per_shard": sps})
        ctx.stats.total = ctx.stats.kept = n
        ctx.info.update(n_shards=n_shards, n_samples=n)


def load_plan(store: RunStore) -> dict[str, Any]:
    return json.loads(store.path(layout.WRITE_PLAN).read_text())


def _rows_parts(store: RunStore, shard: int) -> list[tuple[str, int]]:
    t = pq.read_table(store.path(layout.write_rows(shard)), columns=["src", "part"])
    return sorted(set(zip(t["src"].to_pylist(), t["part"].to_pylist())))


def _spool_dir(planned: PlannedUnit, shard: int) -> str:
    return f"{layout.WRITE_SPOOL}/{shard:05d}/{planned.input_digests[layout.write_rows(shard)]}"


class WriteShardStage(Stage):
    """One unit per shard: its rows + its images (routed from the ingest parts) -> tar, sidecars, HF parquet."""

    name = STAGE

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        plan = load_plan(store)
        cfg = recipe.write
        config = {"shard": [CODE_VERSION, cfg.formats, plan["n_shards"], plan["key_width"]]}
        out = []
        for k in range(plan["n_shards"]):
            parts = _rows_parts(store, k)
            out.append(Unit(f"{k:05d}", config=config, payload=(k, plan["n_shards"], plan["key_width"], parts),
                            inputs=(layout.write_rows(k),) + tuple(layout.ingest_part(s, i) for s, i in parts)))
        return out

    def prepare(self, recipe: Recipe, store: RunStore, pending: list[PlannedUnit]) -> list[Any]:
        """One routing item per ingest part that holds images of a pending shard."""
        need: dict[tuple[str, int], dict[int, str]] = {}
        for pu in pending:
            k, parts = pu.unit.payload[0], pu.unit.payload[3]  # read once, when the units were listed
            for s, i in parts:
                need.setdefault((s, i), {})[k] = _spool_dir(pu, k)
        return [(s, i, dirs) for (s, i), dirs in sorted(need.items())]

    def run_prepared(self, recipe: Recipe, store: RunStore, item: Any) -> int:
        """Read one ingest part once and spool its images to each pending shard that needs them."""
        source, i, dirs = item
        todo = {k: f"{d}/{source}__{layout.part(i)}.parquet" for k, d in dirs.items()}
        todo = {k: rel for k, rel in todo.items() if not store.path(rel).is_file()}  # spooled before a kill
        if not todo:
            return 0
        route = pq.read_table(store.path(layout.write_route(source, i)))
        route = route.filter(pc.is_in(route["shard"], pa.array(sorted(todo), pa.int32())))
        part = pq.read_table(store.path(layout.ingest_part(source, i)), columns=["uid", "image", "status"])
        part = part.filter(pc.equal(part["status"], "success")).drop_columns(["status"])
        need = route.join(part, "uid", join_type="inner").sort_by("pos")
        shard_of = need["shard"].to_pylist()
        n = 0
        for k, idx in sorted(_groups(shard_of).items()):
            rows = need.take(pa.array(idx)).select(["pos", "image"])
            write_parquet_atomic(store.path(todo[k]), rows, compression="none")
            n += rows.num_rows
        return n

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        from .hf import write_hf_shard
        from .wds import write_wds_shard

        shard, n_shards, key_width, _ = unit.payload
        store = ctx.store
        rows = pq.read_table(ctx.path(layout.write_rows(shard)))
        spool = ctx.path(_spool_dir(ctx.planned, shard))
        pieces = [pq.read_table(p) for p in sorted(spool.glob("*.parquet"))] if spool.is_dir() else []
        images = pa.concat_tables(pieces) if pieces else pa.table({"pos": pa.array([], pa.int64()),
                                                                   "image": pa.array([], pa.binary())})
        rows = rows.join(images, "pos", join_type="left outer").sort_by("pos")
        missing = pc.sum(pc.is_null(rows["image"])).as_py() or 0
        if missing:
            raise RuntimeError(f"shard {shard}: {missing} samples have no image in {spool}; re-run the build")
        base = shard * ctx.recipe.write.samples_per_shard
        keys = [f"{shard:05d}{p - base:0{key_width}d}" for p in rows["pos"].to_pylist()]
        rows = rows.append_column("key", pa.array(keys, pa.string()))
        if "webdataset" in ctx.recipe.write.formats:
            write_wds_shard(store, rows, shard)
            for rel in layout.wds_files(shard).values():
                ctx.record(rel)
        if "hf" in ctx.recipe.write.formats:
            write_hf_shard(store, rows, shard, n_shards)
            ctx.record(layout.hf_file(shard, n_shards))
        ctx.stats.total = ctx.stats.kept = rows.num_rows
        for b, c in zip(*np.unique(np.array(rows["bucket"].to_pylist(), dtype=object).astype(str), return_counts=True)):
            ctx.stats.add(f"bucket_{b}", int(c))
        ctx.info["rows"] = rows.num_rows

    def after(self, recipe: Recipe, store: RunStore, plan: StagePlan) -> None:
        remove_tree(store, layout.WRITE_SPOOL)  # every shard is written: the routed images are not needed


class WriteIndexStage(Stage):
    """sizes.json (open_clip's sample counts) and the dataset card, once every shard is written."""

    name = INDEX_STAGE

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        plan = load_plan(store)
        n = plan["n_shards"]
        inputs = [layout.WRITE_PLAN, layout.WRITE_ORDER, layout.WRITE_SELECTION]
        for k in range(n):
            inputs.append(layout.write_rows(k))
            if "webdataset" in recipe.write.formats:
                inputs.append(layout.wds_files(k)["tar"])
            if "hf" in recipe.write.formats:
                inputs.append(layout.hf_file(k, n))
        from ..provenance import models_used

        return [Unit("all", inputs=tuple(inputs), config={"index": [CODE_VERSION, recipe.write, recipe.sha,
                                                                     models_used(recipe)]})]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        from ..provenance import models_used
        from .card import write_card

        plan = load_plan(ctx.store)
        sizes = {f"{k:05d}.tar": pq.read_metadata(ctx.path(layout.write_rows(k))).num_rows
                 for k in range(plan["n_shards"])}
        if "webdataset" in ctx.recipe.write.formats:
            ctx.write_json(layout.SIZES, sizes)
        if "hf" in ctx.recipe.write.formats:
            write_card(ctx.recipe, ctx.store, models_used(ctx.recipe))
            ctx.record(layout.HF_CARD)
        ctx.stats.total = ctx.stats.kept = plan["n_samples"]
        ctx.info.update(n_shards=plan["n_shards"], n_samples=plan["n_samples"])


def summary(store: RunStore) -> dict[str, Any]:
    """Shard and sample counts of a written run (for the flow's result and summary.json)."""
    plan = load_plan(store)
    sizes = {f"{k:05d}.tar": pq.read_metadata(store.path(layout.write_rows(k))).num_rows
             for k in range(plan["n_shards"])}
    return {"n_shards": plan["n_shards"], "n_samples": plan["n_samples"], "sizes": sizes}


def write_all(recipe: Recipe, store: RunStore) -> dict[str, Any]:
    """The three write stages in this process (the flow maps the same units over tasks)."""
    from ..executor import run_stages

    run_stages(recipe, store, [PLAN_STAGE, STAGE, INDEX_STAGE])
    return summary(store)
