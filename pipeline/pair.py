"""Pair: give every successfully ingested train image up to k caption candidates.

Original captions (image-text data) are kept as they are. Labeled images draw from their class's
kept descriptions, deterministically from (seed, uid), so the scoring stage can pick the best match.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import describe, layout
from .executor import Stage, Unit, UnitContext
from .recipe import Recipe
from .stats import StageStats
from .store import RunStore
from .tables import EXCLUDED, PAIRS

STAGE = "pair"


def draw(seed: int, uid: str, n: int, k: int) -> list[int]:
    """Up to ``k`` distinct indices of ``range(n)``, deterministic in (seed, uid).

    A partial Fisher-Yates shuffle driven by one blake2b digest (64 bits per draw), so the cost is
    O(k) per image whatever the pool size, and the choice never depends on a library's RNG stream.
    """
    k = min(k, n)
    if k <= 0:
        return []
    words = hashlib.blake2b(f"{seed}\x00{uid}".encode(), digest_size=min(64, 8 * k)).digest()
    if 8 * k > 64:  # more than 8 draws: extend the stream with counter-keyed digests
        words += b"".join(hashlib.blake2b(f"{seed}\x00{uid}\x00{i}".encode(), digest_size=64).digest()
                          for i in range(1, (8 * k + 63) // 64))
    swaps: dict[int, int] = {}
    out = []
    for j in range(k):
        r = j + int.from_bytes(words[8 * j:8 * j + 8], "big") % (n - j)
        vj, vr = swaps.get(j, j), swaps.get(r, r)
        swaps[r] = vj
        out.append(vr)
    return out


def pair_table(ingest: pa.Table, descriptions: dict[tuple[str, str], list[str]], k: int, seed: int,
               llm: bool) -> tuple[pa.Table, pa.Table, StageStats]:
    """Pure pairing of one ingest part.

    Args:
        ingest: rows with uid, source, domain, class_name, caption, status (failed rows are skipped).
        descriptions: (domain, class_name) -> kept descriptions (:func:`pipeline.describe.load_kept`).
        k: candidates per image (the scoring stage keeps the best match).
        seed: recipe seed; with the uid it fixes each image's draw.
        llm: whether the descriptions came from an LLM ("llm") or the template baseline ("template").

    Returns:
        (pairs, excluded, stats): PAIRS rows, EXCLUDED rows (``no_description``) and the part's stats.
    """
    stats = StageStats(STAGE)
    ok = ingest.filter(pc.equal(ingest["status"], "success"))
    uids, cands, srcs = [], [], []
    ex: dict[str, list] = {f.name: [] for f in EXCLUDED}
    for uid, source, domain, cls, cap in zip(ok["uid"].to_pylist(), ok["source"].to_pylist(), ok["domain"].to_pylist(),
                                             ok["class_name"].to_pylist(), ok["caption"].to_pylist()):
        stats.total += 1
        if cap:
            uids.append(uid), cands.append([cap]), srcs.append("original")
            stats.kept += 1
            continue
        pool = descriptions.get((domain, cls), [])
        if not pool:
            stats.drop("no_description")
            for col, v in zip(("uid", "source", "stage", "drop_reason", "detail"),
                              (uid, source, STAGE, "no_description", f"class {cls!r} ({domain}) has no kept description")):
                ex[col].append(v)
            continue
        order = draw(seed, uid, len(pool), k)
        uids.append(uid), cands.append([pool[i] for i in order]), srcs.append("llm" if llm else "template")
        stats.kept += 1
    pairs = pa.table({"uid": uids, "candidates": cands, "caption_source": srcs}, schema=PAIRS)
    return pairs, pa.table(ex, schema=EXCLUDED), stats


class PairStage(Stage):
    """One unit per ingest part of a train source (eval sources never reach the shards)."""

    name = STAGE

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        from .ingest import ingested_parts

        cfg = recipe.describe
        config = {"pair": [recipe.seed, cfg.captions_per_image, cfg.backend != "template"]}
        return [Unit(layout.source_unit(s, i), config=config, payload=(s, i),
                     inputs=(layout.ingest_part(s, i), layout.DESCRIPTIONS))
                for s, i in ingested_parts(store, recipe, role="train")]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        source, i = unit.payload
        cfg = ctx.recipe.describe
        ingest = pq.read_table(ctx.path(layout.ingest_part(source, i)),
                               columns=["uid", "source", "domain", "class_name", "caption", "status"])
        pairs, excluded, stats = pair_table(ingest, describe.load_kept(ctx.store), cfg.captions_per_image,
                                            ctx.recipe.seed, llm=cfg.backend != "template")
        ctx.stats = ctx.stats.merge(stats)
        ctx.write_parquet(layout.pair_part(source, i), pairs)
        ctx.exclude(excluded)
        ctx.info["rows"] = pairs.num_rows
