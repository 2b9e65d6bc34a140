"""Score stage: CLIP score per pair (:class:`ScoreStage`, per ingest part) and global filters (:class:`FilterStage`).

A score unit embeds the images of one ingest part once, encodes each distinct caption once, keeps
the best of the k candidate captions, applies the per-row rules and writes ``score/<source>/<part>``
plus the part's embeddings in clip-retrieval layout. The filter unit applies the rules that need
every part: eval decontamination, exact and near duplicates, top fraction; it writes
``score/selection.parquet`` (read by pipeline.selection), the dropped rows to ``excluded/filter/``
and a summary with score histograms to ``score/summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import layout
from ..executor import Stage, Unit, UnitContext, torch_resources
from ..recipe import Recipe, ScoreConfig
from ..stats import StageStats
from ..store import RunStore
from ..tables import EXCLUDED, SCORES
from . import embeddings as emb_io
from . import filters as F
from .encoder import get_encoder

log = logging.getLogger(__name__)
STAGE = "score"
FINAL_STAGE = "filter"
CODE_VERSION = "score-v1"  # bump when a part's output changes for the same input
# Settings that change a part's embeddings/choices (re-embed) vs only its per-row decisions (cheap).
EMBED_KEYS = ("model", "device", "dtype", "compile", "best_of_k")
ROW_KEYS = ("min_score", "min_side", "max_aspect")
FINAL_KEYS = ("top", "dedup", "decontaminate", "decontaminate_cosine")
HIST_EDGES = np.round(np.linspace(-1.0, 1.0, 101), 4)


# ----------------------------------------------------------------------------- helpers
def _source_index(recipe: Recipe, source: str) -> int:
    for i, s in enumerate(recipe.sources):
        if s.name == source:
            return i
    raise KeyError(f"source {source!r} is not in the recipe")


def part_number(recipe: Recipe, source: str, part: int) -> str:
    """The clip-retrieval file number N of a part."""
    return emb_io.part_number(_source_index(recipe, source), part)


def _cfg_subset(cfg: ScoreConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in keys}


def _read_ingest(part_path: Path) -> pa.Table:
    cols = ["uid", "source", "domain", "class_name", "orig_id", "image", "width", "height", "orig_width",
            "orig_height", "sha256", "status"]
    t = pq.read_table(part_path, columns=cols)
    return t.filter(pc.equal(t["status"], "success"))


def _dims(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Original image size where ingest recorded it (the rules are about the source image), else stored size."""
    def col(name: str, fallback: str) -> np.ndarray:
        a = pc.coalesce(t[name], t[fallback]).cast(pa.float64())
        return pc.fill_null(a, np.nan).to_numpy(zero_copy_only=False)

    return col("orig_width", "width"), col("orig_height", "height")


def _row_decisions(scores: np.ndarray, w: np.ndarray, h: np.ndarray, cfg: ScoreConfig,
                   errors: list[Optional[str]]) -> tuple[list[Optional[str]], list[Optional[str]]]:
    """Per-row (drop_reason, detail) from the per-row rules."""
    reasons = F.row_filters(w, h, scores, cfg.min_side, cfg.max_aspect, cfg.min_score)
    details: list[Optional[str]] = []
    for i, r in enumerate(reasons):
        if r == F.FAILED_TO_EMBED:
            details.append(errors[i] or "image could not be embedded")
        elif r == F.IMAGE_TOO_SMALL:
            details.append(f"shorter side {int(min(w[i], h[i]))} < min_side {cfg.min_side}")
        elif r == F.EXTREME_ASPECT:
            details.append(f"aspect {max(w[i], h[i]) / min(w[i], h[i]):.2f} > max_aspect {cfg.max_aspect}")
        elif r == F.LOW_SCORE:
            details.append(f"clip_score {scores[i]:.4f} < min_score {cfg.min_score}")
        else:
            details.append(None)
    return reasons, details


def _excluded_table(uids: list[str], source: list[str] | str, reasons: list[Optional[str]],
                    details: list[Optional[str]]) -> pa.Table:
    idx = [i for i, r in enumerate(reasons) if r is not None]
    srcs = [source] * len(uids) if isinstance(source, str) else source
    return pa.table({
        "uid": [uids[i] for i in idx], "source": [srcs[i] for i in idx], "stage": [STAGE] * len(idx),
        "drop_reason": [reasons[i] for i in idx], "detail": [details[i] for i in idx],
    }, schema=EXCLUDED)


# ----------------------------------------------------------------------------- per part
def score_pairs(img: np.ndarray, candidates: list[list[str]], text_emb: dict[str, np.ndarray],
                best_of_k: bool) -> tuple[np.ndarray, list[int]]:
    """Best candidate per image: (scores float32, chosen candidate index per row).

    Args:
        img: (n, d) L2-normalised image embeddings, one per row of ``candidates``.
        candidates: caption candidates per row (at least one each).
        text_emb: caption -> L2-normalised embedding.
        best_of_k: pick the highest-scoring candidate (ties: the first), else always the first.
    """
    scores = np.zeros(len(candidates), np.float32)
    chosen: list[int] = []
    for r, cands in enumerate(candidates):
        use = cands if best_of_k else cands[:1]
        s = np.stack([text_emb[c] for c in use]) @ img[r]
        k = int(np.argmax(s))
        chosen.append(k)
        scores[r] = s[k]
    return scores, chosen


class ScoreStage(Stage):
    """One unit per ingest part of every source: train parts are scored, eval parts only embedded.

    Config parts: ``embed`` (model, device, dtype, best_of_k: what the embeddings and the caption
    choice depend on) and ``rows`` (the per-row thresholds). When only ``rows`` changed, the unit
    re-decides from its stored scores and keeps its embeddings.
    """

    name = STAGE

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.score.enabled

    def resources(self, recipe: Recipe, threads: int, gpus_available: bool) -> dict[str, float]:
        return torch_resources(recipe.score.device, threads, gpus_available)

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        from ..ingest import ingested_parts

        out = []
        for source, i in ingested_parts(store, recipe):
            role = recipe.source(source).role
            inputs = (layout.ingest_part(source, i),) + ((layout.pair_part(source, i),) if role == "train" else ())
            config = {"embed": [CODE_VERSION, role, part_number(recipe, source, i), _cfg_subset(recipe.score, EMBED_KEYS)]}
            if role == "train":
                config["rows"] = _cfg_subset(recipe.score, ROW_KEYS)
            out.append(Unit(layout.source_unit(source, i), config=config, inputs=inputs, payload=(source, i, role)))
        return out

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        source, i, role = unit.payload
        recipe, stats = ctx.recipe, ctx.stats
        part_path = ctx.path(layout.ingest_part(source, i))
        n = part_number(recipe, source, i)
        out_rel = layout.score_part(source, i)
        written: list[str] = []
        if role == "train" and ctx.config_unchanged("embed"):
            # Only per-row thresholds changed: recompute decisions from the stored scores.
            table, excluded = _redecide(recipe, ctx.path(out_rel), part_path)
            for rel in ctx.previous_outputs():
                if rel.startswith(layout.EMBEDDINGS[role] + "/"):
                    ctx.carry(rel)
            stats.add("redecided_parts", 1)
        elif role == "train":
            table, excluded, written = _score_train_part(recipe, ctx.store, source, i, n, stats)
        else:
            table = None
            excluded, written = _embed_eval_part(recipe, ctx.store, source, i, n, stats)
        for rel in written:
            ctx.record(rel)
        if table is not None:
            stats.total = table.num_rows
            stats.kept = int(pc.sum(table["keep"]).as_py() or 0)
            for r in excluded["drop_reason"].to_pylist():
                stats.drop(r)
            for r, d in zip(excluded["drop_reason"].to_pylist(), excluded["detail"].to_pylist()):
                if r not in stats.examples and d:
                    stats.examples[r] = f"{unit.name}: {d}"
            ctx.write_parquet(out_rel, table)
        ctx.exclude(excluded)
        ctx.info.update(n=n, model=recipe.score.model)


def _score_train_part(recipe: Recipe, store: RunStore, source: str, part: int, n: str,
                      stats: StageStats) -> tuple[pa.Table, pa.Table, list[str]]:
    """Scores, excluded rows and the embedding files written (layout names) of one train part."""
    cfg = recipe.score
    part_path = store.path(layout.ingest_part(source, part))
    pair_path = store.path(layout.pair_part(source, part))
    pairs = pq.read_table(pair_path)
    ingest = _read_ingest(part_path)
    pos = {u: i for i, u in enumerate(ingest["uid"].to_pylist())}
    uids = pairs["uid"].to_pylist()
    missing = [u for u in uids if u not in pos]
    if missing:
        raise ValueError(f"{pair_path}: {len(missing)} uids (e.g. {missing[0]}) are not successful rows of "
                         f"{part_path}; re-run the pair stage")
    rows = ingest.take(pa.array([pos[u] for u in uids], pa.int64()))
    enc = get_encoder(cfg.model, cfg.device, cfg.dtype, cfg.batch_size, cfg.compile)
    t0 = time.perf_counter()
    img, errors = enc.encode_images(rows["image"].to_pylist())
    stats.add("image_seconds", round(time.perf_counter() - t0, 4))
    ok = np.array([e is None for e in errors], dtype=bool)
    cands = pairs["candidates"].to_pylist()
    for u, c in zip(uids, cands):
        if not c:
            raise ValueError(f"{pair_path}: uid {u} has no caption candidate; re-run the pair stage")
    ok_cands = [c if cfg.best_of_k else c[:1] for c, good in zip(cands, ok) if good]
    texts = list(dict.fromkeys(t for c in ok_cands for t in c))
    hits0, miss0 = enc.cache_hits, enc.cache_misses
    t0 = time.perf_counter()
    temb = dict(zip(texts, enc.encode_texts(texts))) if texts else {}
    stats.add("text_seconds", round(time.perf_counter() - t0, 4))
    stats.add("texts_encoded", enc.cache_misses - miss0)
    stats.add("text_cache_hits", enc.cache_hits - hits0)
    ok_scores, chosen = score_pairs(img, ok_cands, temb, True)
    stats.add("images_embedded", int(ok.sum()))
    stats.add("pairs_scored", sum(len(c) for c in ok_cands))
    scores = np.full(len(uids), np.nan, np.float32)
    scores[ok] = ok_scores
    captions = [c[0] for c in cands]  # failed rows keep their first candidate (they are dropped)
    for j, (r, k) in enumerate(zip(np.flatnonzero(ok), chosen)):
        captions[r] = ok_cands[j][k]
    w, h = _dims(rows)
    reasons, details = _row_decisions(scores, w, h, cfg, errors)
    table = _scores_table(uids, captions, pairs["caption_source"].to_pylist(), scores, cfg.model, reasons)
    # Embeddings of the embedded rows, with the chosen caption, in clip-retrieval layout.
    sel = rows.filter(pa.array(ok))
    chosen_caps = [captions[r] for r in np.flatnonzero(ok)]
    meta = pa.table({
        "image_path": sel["orig_id"], "caption": pa.array(chosen_caps, pa.string()), "uid": sel["uid"],
        "source": sel["source"], "domain": sel["domain"], "class_name": sel["class_name"], "sha256": sel["sha256"],
        "clip_score": pa.array(ok_scores, pa.float32()),
    })
    text = np.stack([temb[c] for c in chosen_caps]) if chosen_caps else np.zeros((0, img.shape[1]), np.float32)
    written = emb_io.write_part(store, "train", n, img, meta, text)
    return table, _excluded_table(uids, source, reasons, details), written


def _scores_table(uids, captions, caption_sources, scores: np.ndarray, model: str,
                  reasons: list[Optional[str]]) -> pa.Table:
    return pa.table({
        "uid": uids, "caption": captions, "caption_source": caption_sources,
        "clip_score": pa.array(scores, pa.float32(), mask=np.isnan(scores)),
        "score_model": [model] * len(uids), "keep": [r is None for r in reasons], "drop_reason": reasons,
    }, schema=SCORES)


def _redecide(recipe: Recipe, out: Path, part_path: Path) -> tuple[pa.Table, pa.Table]:
    t = pq.read_table(out)
    ingest = _read_ingest(part_path).select(["uid", "width", "height", "orig_width", "orig_height"])
    pos = {u: i for i, u in enumerate(ingest["uid"].to_pylist())}
    rows = ingest.take(pa.array([pos[u] for u in t["uid"].to_pylist()], pa.int64()))
    scores = pc.fill_null(t["clip_score"].cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    old = t["drop_reason"].to_pylist()
    errors = ["image could not be embedded (see the first run's excluded rows)" if r == F.FAILED_TO_EMBED else None
              for r in old]
    w, h = _dims(rows)
    reasons, details = _row_decisions(scores, w, h, recipe.score, errors)
    table = _scores_table(t["uid"].to_pylist(), t["caption"].to_pylist(), t["caption_source"].to_pylist(),
                          scores.astype(np.float32), recipe.score.model, reasons)
    return table, _excluded_table(t["uid"].to_pylist(), out.parent.name, reasons, details)


def _embed_eval_part(recipe: Recipe, store: RunStore, source: str, part: int, n: str,
                     stats: StageStats) -> tuple[pa.Table, list[str]]:
    """Excluded rows (images that failed to embed) and the embedding files written of one eval part."""
    cfg = recipe.score
    rows = _read_ingest(store.path(layout.ingest_part(source, part)))
    enc = get_encoder(cfg.model, cfg.device, cfg.dtype, cfg.batch_size, cfg.compile)
    img, errors = enc.encode_images(rows["image"].to_pylist())
    ok = np.array([e is None for e in errors], dtype=bool)
    sel = rows.filter(pa.array(ok))
    meta = pa.table({
        "image_path": sel["orig_id"], "caption": pa.nulls(sel.num_rows, pa.string()), "uid": sel["uid"],
        "source": sel["source"], "domain": sel["domain"], "class_name": sel["class_name"], "sha256": sel["sha256"],
        "clip_score": pa.nulls(sel.num_rows, pa.float32()),
    })
    written = emb_io.write_part(store, "eval", n, img, meta)
    stats.add("eval_images_embedded", int(ok.sum()))
    if (~ok).any():
        stats.add("eval_failed_to_embed", int((~ok).sum()))
    uids = rows["uid"].to_pylist()
    reasons = [None if good else F.FAILED_TO_EMBED for good in ok]
    return _excluded_table(uids, source, reasons, errors), written


# ----------------------------------------------------------------------------- global filters
def _units(recipe: Recipe, store: RunStore, role: str) -> list[tuple[str, int]]:
    from ..ingest import ingested_parts

    return ingested_parts(store, recipe, role=role)


class FilterStage(Stage):
    """One unit over every scored part: the rules that need all of them -> ``score/selection.parquet``.

    Order (each row keeps the first reason that drops it): per-row rules (from the score stage), eval
    decontamination, exact duplicates, near duplicates, top fraction. Duplicate keepers are the
    best-scoring copy (ties: smallest uid).
    """

    name = FINAL_STAGE

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.score.enabled

    def resources(self, recipe: Recipe, threads: int, gpus_available: bool) -> dict[str, float]:
        return {"num_cpus": threads}  # blocked matrix products over every embedding

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        train, evals = _units(recipe, store, "train"), _units(recipe, store, "eval")
        inputs = [layout.score_part(s, i) for s, i in train]
        for role, units in (("train", train), ("eval", evals)):
            for s, i in units:
                files = layout.embedding_files(role, part_number(recipe, s, i))
                if store.path(files["empty"]).is_file() and not store.path(files["img"]).is_file():
                    inputs.append(files["empty"])  # a part with nothing embedded
                else:
                    inputs += [files["img"], files["meta"]]
        return [Unit("all", config={"final": [CODE_VERSION, _cfg_subset(recipe.score, FINAL_KEYS)]},
                     inputs=tuple(inputs), payload=(train, evals))]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        train_units, eval_units = unit.payload
        result = _finalize(ctx.recipe, ctx.store, train_units, eval_units, ctx.stats)
        ctx.write_parquet(layout.SELECTION, result["selection"])
        ctx.exclude(result["excluded"])
        ctx.write_json(layout.SCORE_SUMMARY, result["summary"])
        ctx.info["rows"] = result["selection"].num_rows


def _load_embeddings(recipe: Recipe, store: RunStore, units: list[tuple[str, int]], role: str
                     ) -> tuple[np.ndarray, pa.Table]:
    mats, metas = [], []
    for s, p in units:
        m, meta = emb_io.read_part(store, role, part_number(recipe, s, p))
        mats.append(m)
        metas.append(meta)
    if not mats:
        return np.zeros((0, 1), np.float16), emb_io.METADATA.empty_table()
    return np.concatenate(mats), pa.concat_tables(metas)


def _finalize(recipe: Recipe, store: RunStore, train_units: list[tuple[str, int]],
              eval_units: list[tuple[str, int]], stats: StageStats) -> dict[str, Any]:
    cfg = recipe.score
    parts = [pq.read_table(store.path(layout.score_part(s, i))) for s, i in train_units]
    scores_t = pa.concat_tables(parts) if parts else SCORES.empty_table()
    sources = [s for (s, _), t in zip(train_units, parts) for _ in range(t.num_rows)]
    n = scores_t.num_rows
    uid = scores_t["uid"].to_pylist()
    score = pc.fill_null(scores_t["clip_score"].cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    reason: list[Optional[str]] = scores_t["drop_reason"].to_pylist()
    detail: list[Optional[str]] = [None] * n
    alive = np.array([r is None for r in reason], dtype=bool)

    E, meta = _load_embeddings(recipe, store, train_units, "train")
    erow = {u: i for i, u in enumerate(meta["uid"].to_pylist())}
    emb_index = np.array([erow.get(u, -1) for u in uid], dtype=np.int64)
    sha = meta["sha256"].to_pylist()
    row_sha = [sha[k] if k >= 0 else None for k in emb_index]
    cls = meta["class_name"].to_pylist()
    row_cls = [cls[k] if k >= 0 else None for k in emb_index]
    dom = meta["domain"].to_pylist()
    row_dom = [dom[k] if k >= 0 else recipe.source(s).domain for k, s in zip(emb_index, sources)]
    if (alive & (emb_index < 0)).any():
        bad = uid[int(np.flatnonzero(alive & (emb_index < 0))[0])]
        raise RuntimeError(f"kept row {bad} has no image embedding: re-run the score stage (delete done/score)")

    order = F.priority_order(score, uid)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)

    def drop(rows: np.ndarray, why: str, info: list[str]) -> None:
        for r, d in zip(rows, info):
            alive[r] = False
            reason[r] = why
            detail[r] = d

    # 1. Decontamination: a train image equal or near-equal to an eval image goes.
    n_eval = 0
    if cfg.decontaminate and eval_units:
        EV, emeta = _load_embeddings(recipe, store, eval_units, "eval")
        n_eval = EV.shape[0]
        euid, esrc = emeta["uid"].to_pylist(), emeta["source"].to_pylist()
        eval_sha = {h: (u, s) for h, u, s in zip(emeta["sha256"].to_pylist(), euid, esrc) if h}
        rows = np.flatnonzero(alive)
        same = [r for r in rows if row_sha[r] in eval_sha]
        drop(np.array(same, np.int64), F.CONTAMINATED,
             [f"same bytes (sha256) as eval image {eval_sha[row_sha[r]][0]} of {eval_sha[row_sha[r]][1]}" for r in same])
        rows = np.flatnonzero(alive)
        m = F.cosine_matches(E[emb_index[rows]], cfg.decontaminate_cosine, EV, block=cfg.dedup.block_size)
        hit, partner, pcos = F.any_match(len(rows), m)
        drop(rows[hit], F.CONTAMINATED, [f"near-duplicate of eval image {euid[partner[k]]} of {esrc[partner[k]]} "
                                         f"(cosine {pcos[k]:.4f})" for k in np.flatnonzero(hit)])
    # 2. Exact duplicates across all train sources.
    if cfg.dedup.exact:
        rows = np.flatnonzero(alive)
        keep, keeper = F.exact_duplicates([row_sha[r] for r in rows], rank[rows])
        gone = np.flatnonzero(~keep)
        drop(rows[gone], F.DUP_EXACT, [f"same bytes (sha256) as {uid[rows[keeper[k]]]}" for k in gone])
    # 3. Near duplicates by image-embedding cosine.
    if cfg.dedup.near_cosine is not None:
        rows = np.flatnonzero(alive)
        t0 = time.perf_counter()
        m = F.cosine_matches(E[emb_index[rows]], cfg.dedup.near_cosine, block=cfg.dedup.block_size)
        keep, keeper, kcos = F.greedy_keep(len(rows), m, rank[rows])
        stats.add("near_dup_pairs", len(m))
        stats.add("near_dup_seconds", round(time.perf_counter() - t0, 3))
        gone = np.flatnonzero(~keep)
        drop(rows[gone], F.DUP_NEAR, [f"near-duplicate of {uid[rows[keeper[k]]]} (cosine {kcos[k]:.4f})" for k in gone])
    # 4. Top fraction of what is left.
    if cfg.top is not None:
        rows = np.flatnonzero(alive)
        groups = None
        if cfg.top.by == "source":
            groups = [sources[r] for r in rows]
        elif cfg.top.by == "class":
            groups = [(sources[r], row_cls[r]) for r in rows]
        keep = F.top_fraction(score[rows], [uid[r] for r in rows], cfg.top.fraction, groups)
        gone = np.flatnonzero(~keep)
        drop(rows[gone], F.BELOW_TOP,
             [f"clip_score {score[rows[k]]:.4f} outside the top {cfg.top.fraction:.0%} ({cfg.top.by})" for k in gone])

    selection = pa.table({
        "uid": uid, "caption": scores_t["caption"], "caption_source": scores_t["caption_source"],
        "clip_score": scores_t["clip_score"], "score_model": scores_t["score_model"],
        "keep": pa.array(alive), "drop_reason": pa.array(reason, pa.string()),
    }, schema=SCORES)
    # Global drops (per-row drops are already in excluded/score/<source>/<part>.parquet).
    was_row = {i for i, r in enumerate(scores_t["drop_reason"].to_pylist()) if r is not None}
    g = [i for i in range(n) if not alive[i] and i not in was_row]
    excluded = pa.table({
        "uid": [uid[i] for i in g], "source": [sources[i] for i in g], "stage": [STAGE] * len(g),
        "drop_reason": [reason[i] for i in g], "detail": [detail[i] for i in g],
    }, schema=EXCLUDED)

    stats.total = n
    stats.kept = int(alive.sum())
    for r in reason:
        if r is not None:
            stats.drop(r)
    for i in g:
        if reason[i] not in stats.examples and detail[i]:
            stats.examples[reason[i]] = f"{uid[i]}: {detail[i]}"
    stats.add("eval_images", n_eval)
    summary = _summary(recipe, sources, row_dom, score, alive, reason, n_eval)
    return {"selection": selection, "excluded": excluded, "summary": summary}


def _hist(x: np.ndarray) -> list[int]:
    x = x[~np.isnan(x)]
    return np.histogram(np.clip(x, -1.0, 1.0), bins=HIST_EDGES)[0].astype(int).tolist()


def _summary(recipe: Recipe, sources: list[str], domains: list[str], score: np.ndarray, alive: np.ndarray,
             reason: list[Optional[str]], n_eval: int) -> dict[str, Any]:
    """Counts per reason and per source, score histograms per domain (all pairs and kept pairs)."""
    cfg = recipe.score
    by_source: dict[str, dict[str, Any]] = {}
    for s in [x.name for x in recipe.sources if x.role == "train"]:
        idx = [i for i, v in enumerate(sources) if v == s]
        by_source[s] = {"total": len(idx), "kept": int(alive[idx].sum()) if idx else 0,
                        "dropped": dict(sorted(Counter(reason[i] for i in idx if reason[i]).items()))}
    hist: dict[str, Any] = {}
    doms = np.array(domains, dtype=object)
    for d in sorted(set(domains)):
        m = doms == d
        s_all = score[m]
        valid = s_all[~np.isnan(s_all)]
        hist[d] = {
            "pairs": int(m.sum()), "kept": int((m & alive).sum()),
            "mean": round(float(valid.mean()), 5) if valid.size else None,
            "median": round(float(np.median(valid)), 5) if valid.size else None,
            "all": _hist(s_all), "kept_hist": _hist(score[m & alive]),
        }
    return {
        "model": cfg.model,
        "settings": {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v)
                     for k, v in _cfg_subset(cfg, ROW_KEYS + FINAL_KEYS).items()},
        "total": int(len(score)), "kept": int(alive.sum()),
        "dropped": dict(sorted(Counter(r for r in reason if r).items())),
        "by_source": by_source, "eval_images": n_eval,
        "histogram_edges": HIST_EDGES.tolist(), "histograms": hist,
    }


def load_summary(store: RunStore) -> dict[str, Any]:
    """The summary finalize wrote (for the CLI, the report and the flow's table artifact)."""
    import json

    p = store.path(layout.SCORE_SUMMARY)
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: run the score stage (finalize) first")
    return json.loads(p.read_text())


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (source, total, kept, one column per reason) for a CLI table or a Prefect table artifact."""
    reasons = sorted({r for v in summary["by_source"].values() for r in v["dropped"]})
    rows = []
    for s, v in summary["by_source"].items():
        rows.append({"source": s, "total": v["total"], "kept": v["kept"], **{r: v["dropped"].get(r, 0) for r in reasons}})
    rows.append({"source": "ALL", "total": summary["total"], "kept": summary["kept"],
                 **{r: summary["dropped"].get(r, 0) for r in reasons}})
    return rows

