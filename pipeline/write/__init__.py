"""Write: manifest -> webdataset shards + Hugging Face parquet layout + dataset card.

Three steps, each resumable:
1. ``plan``: expand the manifest (uid x repeats) into a global, seeded order and cut it into shards.
   Copies of an upsampled sample sit at evenly spread positions, so they land in different shards.
2. ``route_part``: one pass per ingest part sends each needed image to its shard's spool folder
   (a shuffle by shard: every image is read once, whatever the order).
3. ``write_shard``: one task per shard assembles its rows in order and writes tar + sidecars + HF parquet.
``finalize`` writes sizes.json, the dataset card and the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import selection
from ..recipe import Recipe, fingerprint
from ..stats import StageStats
from ..store import RunStore, write_json_atomic, write_parquet_atomic
from ..tables import MANIFEST

log = logging.getLogger(__name__)
STAGE = "write"
CODE_VERSION = "write-v1"


@dataclass
class WritePlan:
    fingerprint: str
    n_shards: int
    n_samples: int
    key_width: int


def manifest(recipe: Recipe, store: RunStore) -> pa.Table:
    """The mix manifest, or every kept sample once when mixing is off."""
    if recipe.mix.enabled and store.path("mix", "manifest.parquet").exists():
        return pq.read_table(store.path("mix", "manifest.parquet"))
    if recipe.mix.enabled:
        raise FileNotFoundError(f"{store.path('mix', 'manifest.parquet')} is missing: run the mix stage first")
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


def plan(recipe: Recipe, store: RunStore) -> WritePlan:
    man = manifest(recipe, store)
    if man.num_rows and pc.min(man["repeats"]).as_py() < 1:
        raise ValueError("manifest has repeats < 1")
    order = expand(man, recipe.seed)
    sps = recipe.write.samples_per_shard
    n = order.num_rows
    n_shards = max(1, -(-n // sps)) if n else 0
    pos = np.arange(n)
    order = order.append_column("pos", pa.array(pos, pa.int64()))
    order = order.append_column("shard", pa.array((pos // sps).astype(np.int32)))
    sel = selection.load(recipe, store, kept_only=True)
    fp = fingerprint(CODE_VERSION, recipe.seed, recipe.write, _table_hash(order), _table_hash(sel))
    write_parquet_atomic(store.path(STAGE, "order.parquet"), order)
    write_parquet_atomic(store.path(STAGE, "selection.parquet"), sel)
    plan = WritePlan(fp, n_shards, n, max(4, len(str(sps - 1))))
    write_json_atomic(store.path(STAGE, "plan.json"), plan.__dict__)
    return plan


def _table_hash(t: pa.Table) -> str:
    h = hashlib.sha256()
    for col in t.column_names:
        h.update(col.encode())
        for chunk in t[col].chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()[:16]


def load_plan(store: RunStore) -> WritePlan:
    return WritePlan(**json.loads(store.path(STAGE, "plan.json").read_text()))


def route_part(recipe: Recipe, store: RunStore, plan: WritePlan, source: str, part_path: Path) -> int:
    """Send the images of one ingest part to the spool folders of the shards that need them."""
    unit = f"route/{source}/{part_path.stem}"
    fp = fingerprint(plan.fingerprint, store.done_fingerprint("ingest", f"{source}/{part_path.stem}"))
    if store.is_done(STAGE, unit, fp):
        return 0
    order = pq.read_table(store.path(STAGE, "order.parquet"), columns=["uid", "pos", "shard"])
    part = pq.read_table(part_path, columns=["uid", "image", "status"])
    part = part.filter(pc.equal(part["status"], "success")).drop_columns(["status"])
    need = order.join(part, "uid", join_type="inner")
    n = 0
    for shard in sorted(set(need["shard"].to_pylist())):
        rows = need.filter(pc.equal(need["shard"], shard)).select(["pos", "image"]).sort_by("pos")
        write_parquet_atomic(store.path(STAGE, "_spool", plan.fingerprint, f"{shard:05d}", f"{source}__{part_path.stem}.parquet"),
                             rows, compression="none")
        n += rows.num_rows
    store.mark_done(STAGE, unit, fp, rows=n)
    return n


def write_shard(recipe: Recipe, store: RunStore, plan: WritePlan, shard: int) -> StageStats:
    """Write shard ``shard`` in every requested format (atomic; skipped when already done)."""
    from .hf import write_hf_shard
    from .wds import write_wds_shard

    unit = f"shard/{shard:05d}"
    fp = fingerprint(plan.fingerprint, shard)
    if store.is_done(STAGE, unit, fp):
        return store.read_unit_stats(STAGE, unit)
    stats = StageStats(STAGE)
    with stats.timer():
        order = pq.read_table(store.path(STAGE, "order.parquet"))
        rows = order.filter(pc.equal(order["shard"], shard))
        spool = store.path(STAGE, "_spool", plan.fingerprint, f"{shard:05d}")
        pieces = [pq.read_table(p) for p in sorted(spool.glob("*.parquet"))] if spool.exists() else []
        images = pa.concat_tables(pieces) if pieces else pa.table({"pos": pa.array([], pa.int64()),
                                                                   "image": pa.array([], pa.binary())})
        rows = rows.join(images, "pos", join_type="left outer")
        sel = pq.read_table(store.path(STAGE, "selection.parquet"))
        rows = rows.join(sel.drop_columns(["keep", "drop_reason", "score_model"]), "uid", join_type="left outer")
        rows = rows.sort_by("pos")
        missing = pc.sum(pc.is_null(rows["image"])).as_py() or 0
        if missing:
            raise RuntimeError(f"shard {shard}: {missing} samples have no image in the spool; re-run the write stage")
        base = shard * recipe.write.samples_per_shard
        keys = [f"{shard:05d}{p - base:0{plan.key_width}d}" for p in rows["pos"].to_pylist()]
        rows = rows.append_column("key", pa.array(keys, pa.string()))
        if "webdataset" in recipe.write.formats:
            write_wds_shard(store, rows, shard)
        if "hf" in recipe.write.formats:
            write_hf_shard(store, rows, shard, plan.n_shards)
    stats.total = stats.kept = rows.num_rows
    for b, c in zip(*np.unique(np.array(rows["bucket"].to_pylist(), dtype=object).astype(str), return_counts=True)):
        stats.add(f"bucket_{b}", int(c))
    store.write_unit_stats(stats, unit)
    store.mark_done(STAGE, unit, fp, rows=rows.num_rows)
    return stats


def write_all(recipe: Recipe, store: RunStore, models: dict[str, str] | None = None) -> dict:
    """Every write step in order, in this process (the flow runs the same steps as mapped tasks)."""
    from ..ingest import ingested_parts

    plan_ = plan(recipe, store)
    for source, part in ingested_parts(store, recipe, role="train"):
        route_part(recipe, store, plan_, source, part)
    for shard in range(plan_.n_shards):
        write_shard(recipe, store, plan_, shard)
    return finalize(recipe, store, plan_, models or {})


def finalize(recipe: Recipe, store: RunStore, plan: WritePlan, models: dict[str, str]) -> dict:
    """sizes.json, dataset card, removal of shards left from a larger earlier run, spool cleanup."""
    from .card import write_card

    sizes = {}
    wds_dir = store.path("shards", "wds")
    for shard in range(plan.n_shards):
        st = store.read_unit_stats(STAGE, f"shard/{shard:05d}")
        sizes[f"{shard:05d}.tar"] = st.total
    if "webdataset" in recipe.write.formats:
        for stale in sorted(wds_dir.glob("*.tar")):
            if stale.name not in sizes:
                for ext in (".tar", ".parquet", "_stats.json"):
                    (wds_dir / f"{stale.stem}{ext}").unlink(missing_ok=True)
        write_json_atomic(wds_dir / "sizes.json", sizes)
    summary = {"n_shards": plan.n_shards, "n_samples": plan.n_samples, "sizes": sizes}
    if "hf" in recipe.write.formats:
        hf_data = store.path("shards", "hf", "data")
        expected = {f"train-{s:05d}-of-{plan.n_shards:05d}.parquet" for s in range(plan.n_shards)}
        for stale in sorted(hf_data.glob("*.parquet")) if hf_data.exists() else []:
            if stale.name not in expected:
                stale.unlink()
        write_card(recipe, store, models)
    import shutil

    shutil.rmtree(store.path(STAGE, "_spool"), ignore_errors=True)
    return summary
