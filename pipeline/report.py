"""Run report: ``OUT/report/index.html`` plus matplotlib PNGs, readable from disk without a server.

Everything comes from what the run store holds; a stage that did not run (or whose files are gone)
leaves its section out with a note, and a section whose files cannot be read says so instead of
failing the report:

- stage table, timings and throughput: ``stats/<stage>/*.json`` (summed per stage) and ``summary.json``;
- class counts before filtering, after filtering and after mixing: ingest parts, ``write/selection.parquet``
  (or ``score/selection.parquet``) and ``write/order.parquet`` (one row per copy in the shards);
- CLIP score histograms per domain: ``score/selection.parquet``;
- a sample grid (thumbnail, caption, score): the first rows of the Hugging Face shards (or the tar shards);
- the mix report (``mix/mix_report.json``) and the zero-shot table (``eval/results.json``).
"""

from __future__ import annotations

import html
import io
import json
import logging
import tarfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout
from .executor import Stage, Unit, UnitContext
from .recipe import Recipe, RecipeError, parse_recipe
from .stats import StageStats
from .store import RunStore, write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

STAGE = "report"
REPORT_VERSION = "report-v1"
STAGE_ORDER = ("ingest", "describe", "pair", "score", "filter", "mix", "write-plan", "write", "write-index", "train",
               "eval")
MAX_CLASS_BARS = 40
GRID_SAMPLES = 16
DPI = 100
_COLOURS = {"before filtering": "#9e9e9e", "after filtering": "#4c72b0", "after mixing": "#dd8452"}


# ----------------------------------------------------------------------------- loading
def run_recipe(store: RunStore) -> Recipe:
    """The recipe a run was built with (``recipe.resolved.yaml``, written by the flow).

    Raises:
        RecipeError: the run folder has no readable resolved recipe.
    """
    import yaml

    p = store.path(layout.RECIPE)
    if not p.is_file():
        raise RecipeError(f"{p}: not found; is {store.root} a run folder (alive build --out ...)?")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    return parse_recipe(data, where=str(p))


def _read_json(p: Path) -> Optional[dict]:
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def stage_stats(store: RunStore) -> dict[str, StageStats]:
    """Every stage's stats summed over its units, in pipeline order (stages without stats left out)."""
    d = store.path(layout.STATS)
    names = sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    ordered = [s for s in STAGE_ORDER if s in names]
    return {s: store.read_stats(s) for s in ordered}


def _class_label(domain: Any, cls: Any) -> str:
    return f"{domain} / {cls if cls is not None else '(no class)'}"


def _counts(t: pa.Table) -> Counter:
    return Counter(_class_label(d, c) for d, c in zip(t["domain"].to_pylist(), t["class_name"].to_pylist()))


def class_counts(recipe: Recipe, store: RunStore) -> dict[str, Counter]:
    """(domain / class) counts of the train samples at three points of the pipeline.

    Returns:
        {"before filtering": ..., "after filtering": ..., "after mixing": ...}; a point whose files
        are missing is left out. "after mixing" counts copies (repeats included), as in the shards.
    """
    from . import selection

    out: dict[str, Counter] = {}
    meta = selection.metadata(recipe, store)
    if meta.num_rows:
        out["before filtering"] = _counts(meta)
    kept: Optional[pa.Table] = None
    wsel = store.path(layout.WRITE_SELECTION)
    ssel = store.path(layout.SELECTION)
    if wsel.is_file():
        kept = pq.read_table(wsel, columns=["uid", "domain", "class_name"])
    elif ssel.is_file() and meta.num_rows:
        s = pq.read_table(ssel, columns=["uid", "keep"])
        kept = s.filter(s["keep"]).join(meta.select(["uid", "domain", "class_name"]), "uid", join_type="inner")
    if kept is not None:
        out["after filtering"] = _counts(kept)
    order = store.path(layout.WRITE_ORDER)
    if order.is_file() and kept is not None:
        o = pq.read_table(order, columns=["uid"])
        out["after mixing"] = _counts(o.join(kept.select(["uid", "domain", "class_name"]), "uid", join_type="inner"))
    return out


def scores_by_domain(recipe: Recipe, store: RunStore) -> dict[str, dict[str, np.ndarray]]:
    """domain -> {"kept": scores, "dropped": scores} of the scored train samples (empty when not scored)."""
    from . import selection

    p = store.path(layout.SELECTION)
    if not p.is_file():
        return {}
    s = pq.read_table(p, columns=["uid", "clip_score", "keep"])
    s = s.filter(pc.is_valid(s["clip_score"]))
    meta = selection.metadata(recipe, store).select(["uid", "domain"])
    t = s.join(meta, "uid", join_type="inner")
    out: dict[str, dict[str, np.ndarray]] = {}
    dom = np.array(t["domain"].to_pylist(), dtype=object)
    score = t["clip_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    keep = t["keep"].to_numpy(zero_copy_only=False).astype(bool)
    for d in sorted(set(dom.tolist())):
        m = dom == d
        out[d] = {"kept": score[m & keep], "dropped": score[m & ~keep]}
    return out


@dataclass
class Sample:
    image: bytes
    caption: str
    score: Optional[float]
    domain: str
    class_name: Optional[str]
    key: str


def samples_files(store: RunStore) -> list[Path]:
    """The shard file :func:`samples` reads: the first HF parquet shard, else the first tar."""
    for folder, pattern in ((layout.HF_DATA, "train-*.parquet"), (layout.WDS, "*.tar")):
        d = store.path(folder)
        found = sorted(d.glob(pattern)) if d.is_dir() else []
        if found:
            return found[:1]
    return []


def samples(store: RunStore, n: int = GRID_SAMPLES) -> list[Sample]:
    """Up to ``n`` samples spread evenly over the first row group of the first shard.

    The Hugging Face parquet shards are read when present (one row group, not the whole shard); the
    first webdataset tar otherwise.
    """
    hf = sorted(store.path(layout.HF_DATA).glob("train-*.parquet")) if store.path(layout.HF_DATA).is_dir() else []
    if hf:
        pf = pq.ParquetFile(hf[0])
        if pf.metadata.num_row_groups == 0:
            return []
        t = pf.read_row_group(0, columns=["image", "caption", "clip_score", "domain", "class_name", "key", "uid"])
        # one copy per sample: upsampled samples repeat in the shards
        first = np.unique(np.array(t["uid"].to_pylist(), dtype=object), return_index=True)[1] if t.num_rows else []
        t = t.take(pa.array(np.sort(first), pa.int64()))
        idx = np.unique(np.linspace(0, t.num_rows - 1, num=min(n, t.num_rows)).round().astype(int)) if t.num_rows else []
        rows = t.take(pa.array(idx, pa.int64())).to_pylist()
        return [Sample(r["image"]["bytes"], r["caption"], r["clip_score"], r["domain"], r["class_name"], r["key"])
                for r in rows]
    tars = sorted(store.path(layout.WDS).glob("*.tar")) if store.path(layout.WDS).is_dir() else []
    if not tars:
        return []
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tars[0]) as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            f = tf.extractfile(m)
            if f is not None:
                members.setdefault(key, {})[ext] = f.read()
    keys = sorted(k for k, v in members.items() if "jpg" in v)
    idx = np.unique(np.linspace(0, len(keys) - 1, num=min(n, len(keys))).round().astype(int)) if keys else []
    out = []
    for i in idx:
        k = keys[int(i)]
        meta = json.loads(members[k].get("json", b"{}"))
        out.append(Sample(members[k]["jpg"], members[k].get("txt", b"").decode("utf-8", "replace"),
                          meta.get("clip_score"), meta.get("domain", ""), meta.get("class_name"), k))
    return out


# ----------------------------------------------------------------------------- figures
def _new_figure(w: float, h: float):
    """A figure not registered with pyplot: no global state, safe in worker threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, tight: bool = False) -> bytes:
    """PNG bytes; ``tight`` crops to the drawn artists (labels and legends outside the axes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, **({"bbox_inches": "tight"} if tight else {}))
    return buf.getvalue()


def plot_class_counts(counts: dict[str, Counter]) -> tuple[bytes, bytes, list[str]]:
    """(per-domain PNG, per-class PNG, classes shown): grouped bars for each point of the pipeline.

    The class chart shows the ``MAX_CLASS_BARS`` classes with the most samples before filtering; the
    HTML table lists every class.
    """
    points = list(counts)
    domains: dict[str, Counter] = {p: Counter() for p in points}
    for p, c in counts.items():
        for label, v in c.items():
            domains[p][label.split(" / ", 1)[0]] += v
    dnames = sorted(set().union(*[set(d) for d in domains.values()]))
    fig = _new_figure(max(5.0, 1.2 * len(dnames) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(points))
    x = np.arange(len(dnames))
    for i, p in enumerate(points):
        ax.bar(x + i * width, [domains[p][d] for d in dnames], width, label=p, color=_COLOURS.get(p))
    ax.set_xticks(x + width * (len(points) - 1) / 2, dnames)
    ax.set_ylabel("samples")
    ax.set_title("Samples per domain")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    by_domain = _png(fig, tight=True)

    ref = counts.get("before filtering") or next(iter(counts.values()))
    classes = [c for c, _ in sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))][:MAX_CLASS_BARS]
    fig = _new_figure(8.0, max(2.5, 0.32 * len(classes) * max(1, len(points)) / 2 + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(classes))
    h = 0.8 / max(1, len(points))
    for i, p in enumerate(points):
        ax.barh(y + i * h, [counts[p].get(c, 0) for c in classes], h, label=p, color=_COLOURS.get(p))
    ax.set_yticks(y + h * (len(points) - 1) / 2, classes, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_title(f"Samples per class ({len(classes)} largest)" if len(ref) > len(classes) else "Samples per class")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return by_domain, _png(fig, tight=True), classes


def plot_scores(scores: dict[str, dict[str, np.ndarray]], min_score: Optional[float]) -> bytes:
    """One histogram per domain, kept and dropped samples stacked, the threshold as a line."""
    doms = list(scores)
    cols = min(2, len(doms))
    rows = -(-len(doms) // cols)
    fig = _new_figure(4.2 * cols, 2.8 * rows)
    allv = np.concatenate([np.concatenate([v["kept"], v["dropped"]]) for v in scores.values()])
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 31)
    for i, d in enumerate(doms):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist([scores[d]["kept"], scores[d]["dropped"]], bins=bins, stacked=True, color=["#4c72b0", "#c44e52"],
                label=["kept", "dropped"])
        if min_score is not None:
            ax.axvline(min_score, color="black", linestyle="--", linewidth=1, label=f"min_score {min_score}")
        n = scores[d]["kept"].size + scores[d]["dropped"].size
        ax.set_title(f"{d} ({n} scored)", fontsize=9)
        ax.set_xlabel("CLIP score", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("CLIP score per domain")
    h = 2.8 * rows  # margins in inches, whatever the number of rows
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.5 / h, top=1 - 0.55 / h, hspace=0.6, wspace=0.25)
    return _png(fig)


def plot_samples(items: list[Sample], cell: int = 160) -> bytes:
    """Thumbnail grid with each sample's domain, CLIP score and caption (wrapped).

    The thumbnails are pasted into one mosaic (one matplotlib image, not one axes per sample: the
    report stays cheap to render for any grid size).
    """
    from PIL import Image

    cols = min(4, max(1, len(items)))
    rows = -(-len(items) // cols)
    pad = 8
    mosaic = Image.new("RGB", (cols * (cell + pad), rows * (cell + pad)), "white")
    unreadable = []
    for i, s in enumerate(items):
        r, c = divmod(i, cols)
        try:
            with Image.open(io.BytesIO(s.image)) as im:
                im = im.convert("RGB")
                im.thumbnail((cell, cell))
                mosaic.paste(im, (c * (cell + pad) + (cell - im.width) // 2, r * (cell + pad) + (cell - im.height) // 2))
        except Exception as e:  # one unreadable image never hides the others
            unreadable.append((i, type(e).__name__))
    text_h = 0.75  # inches of caption under each row
    w_in = cols * (cell + pad) / DPI
    h_img = rows * (cell + pad) / DPI
    fig = _new_figure(w_in, h_img + rows * text_h)
    fig.subplots_adjust(0, 0, 1, 1)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, mosaic.width)
    ax.set_ylim(mosaic.height + rows * text_h * DPI, 0)
    # place each image row above its caption band
    arr = np.asarray(mosaic)
    for r in range(rows):
        y0 = r * (cell + pad + text_h * DPI)
        band = arr[r * (cell + pad):(r + 1) * (cell + pad)]
        ax.imshow(band, extent=(0, mosaic.width, y0 + cell + pad, y0), interpolation="nearest")
        for c in range(cols):
            i = r * cols + c
            if i >= len(items):
                break
            s = items[i]
            score = "no score" if s.score is None else f"score {s.score:.3f}"
            cap = "\n".join(textwrap.wrap(s.caption or "", 30)[:3])
            ax.text(c * (cell + pad) + 2, y0 + cell + pad + 2, f"{s.domain} · {score}\n{cap}", fontsize=6.5,
                    va="top", ha="left")
    for i, err in unreadable:
        r, c = divmod(i, cols)
        ax.text(c * (cell + pad) + cell / 2, r * (cell + pad + text_h * DPI) + cell / 2, f"unreadable\n{err}",
                ha="center", va="center", fontsize=7)
    ax.axis("off")
    return _png(fig)


def plot_timings(stats: dict[str, StageStats]) -> bytes:
    """Seconds per stage (summed over its tasks), annotated with items per task-second."""
    names = [s for s, st in stats.items() if st.seconds > 0 or st.total > 0]
    secs = [stats[s].seconds for s in names]
    fig = _new_figure(7.0, max(2.0, 0.45 * len(names) + 1))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    ax.barh(y, secs, color="#55a868")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (summed over the stage's tasks)")
    for i, s in enumerate(names):
        rate = _rate(stats[s])
        ax.text(secs[i], i, f"  {stats[s].total} items" + (f", {rate:.1f}/s" if rate else ""), va="center", fontsize=8)
    ax.set_xlim(0, max(secs + [1e-3]) * 1.45)
    ax.set_title("Stage timings and throughput")
    return _png(fig, tight=True)


def _rate(st: StageStats) -> Optional[float]:
    return st.total / st.seconds if st.seconds > 0 and st.total else None


# ----------------------------------------------------------------------------- html
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _table(rows: list[dict[str, Any]], cols: Optional[list[str]] = None) -> str:
    if not rows:
        return "<p class='note'>(empty)</p>"
    cols = cols or list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return v


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left}
th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}.note{color:#666;font-style:italic}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}code{background:#f4f4f4;padding:0 .2em}
"""


@dataclass
class _Page:
    parts: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def add(self, s: str) -> None:
        self.parts.append(s)

    def image(self, name: str, png: bytes, alt: str) -> None:
        self.images[name] = png
        self.parts.append(f"<p><img src='{_e(name)}' alt='{_e(alt)}'></p>")

    def section(self, title: str, fn: Callable[[], None]) -> None:
        """Render one section; a failure is shown in the page (and logged), never fatal to the report."""
        self.add(f"<h2>{_e(title)}</h2>")
        try:
            fn()
        except Exception as e:
            log.warning("report: section %r could not be rendered: %s", title, e)
            self.add(f"<p class='warn'>This section could not be rendered: {_e(type(e).__name__)}: {_e(e)}</p>")


def build(recipe: Recipe, store: RunStore) -> Path:
    """Run the report stage (skipped when what it reads is unchanged); returns the path of index.html."""
    from .executor import run_stages

    run_stages(recipe, store, [STAGE])
    return store.path(layout.REPORT_INDEX)


# Files the report reads (besides the stats files of every stage): its inputs when present.
_READS = (layout.WRITE_PLAN, layout.WRITE_ORDER, layout.WRITE_SELECTION, layout.SELECTION, layout.SCORE_SUMMARY,
          layout.MIX_REPORT, layout.EVAL_RESULTS, layout.EVAL_PLOT, layout.SIZES)


class ReportStage(Stage):
    """One unit: report/index.html and its PNGs from the run folder's summary, tables and shards."""

    name = STAGE

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        inputs = [rel for rel in _READS if store.path(rel).is_file()]
        stats_dir = store.path(layout.STATS)
        inputs += sorted(p.relative_to(store.root).as_posix() for name in STAGE_ORDER
                         for p in (stats_dir / name).glob("*.json"))
        inputs += sorted(p.relative_to(store.root).as_posix() for p in samples_files(store))
        ingest = store.path(layout.INGEST)
        if ingest.is_dir():
            inputs += sorted(p.relative_to(store.root).as_posix() for p in ingest.glob("*/part-*.parquet"))
        return [Unit("all", inputs=tuple(inputs), config={"report": [REPORT_VERSION, recipe.sha]})]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        ctx.write_json(layout.SUMMARY, run_summary(ctx.recipe, ctx.store))
        for rel in render(ctx.recipe, ctx.store):
            ctx.record(rel)


def run_summary(recipe: Recipe, store: RunStore) -> dict[str, Any]:
    """summary.json: recipe, models, every stage's stats summed over its units, shard counts."""
    from .provenance import models_used

    out: dict[str, Any] = {"recipe": recipe.name, "recipe_hash": recipe.sha, "models": models_used(recipe),
                           "stages": {k: v.to_dict() for k, v in stage_stats(store).items()}}
    if store.path(layout.WRITE_PLAN).is_file():
        from .write import summary

        out["shards"] = summary(store)
    return out


def render(recipe: Recipe, store: RunStore) -> list[str]:
    """Write ``report/index.html`` and its PNGs for the run in ``store``.

    Args:
        recipe: the run's recipe (sources, thresholds).
        store: the run folder.

    Returns:
        The layout names of the files written (index.html last).
    """
    page = _Page()
    summary = _read_json(store.path(layout.SUMMARY)) or {}
    stats = stage_stats(store)
    models = summary.get("models") or {}
    shards = summary.get("shards") or {}

    page.add(f"<h1>{_e(recipe.name)}: build report</h1>")
    synthetic = [s.name for s in recipe.sources if s.kind == "synthetic"]
    if synthetic:
        page.add(f"<p class='warn'><b>Synthetic data.</b> Sources {_e(', '.join(synthetic))} are procedurally "
                 "drawn images (demo/test data), not photographs.</p>")
    if models.get("untrained"):
        page.add("<p class='warn'><b>Tiny untrained models.</b> Built locally with random weights: their "
                 "scores and any evaluation carry no meaning.</p>")
    overview = [
        {"item": "run folder", "value": str(store.root)},
        {"item": "recipe hash", "value": summary.get("recipe_hash", recipe.sha)},
        {"item": "seed", "value": recipe.seed},
        {"item": "shards", "value": shards.get("n_shards")},
        {"item": "samples in shards", "value": shards.get("n_samples")},
    ] + [{"item": f"model ({k})", "value": v} for k, v in sorted(models.items())]
    page.add(_table(overview))
    page.add("<p>Shards: <a href='../shards/wds/'>webdataset</a> · <a href='../shards/hf/'>Hugging Face parquet</a>"
             " (<a href='../shards/hf/README.md'>dataset card</a>)</p>")

    def stages() -> None:
        if not stats:
            page.add("<p class='note'>No stage statistics in this run folder yet.</p>")
            return
        rows = []
        for name, st in stats.items():
            rate = _rate(st)
            rows.append({"stage": name, "total": st.total, "kept": st.kept, "dropped": st.n_dropped,
                         "drop reasons": ", ".join(f"{k}={v}" for k, v in sorted(st.dropped.items())),
                         "seconds": round(st.seconds, 2), "items/s": round(rate, 2) if rate else "",
                         "counters": ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(st.counters.items()))})
        page.add(_table(rows))
        page.add("<p class='note'>Seconds are summed over a stage's tasks (work done, not wall-clock: tasks of a "
                 "stage run in parallel). Re-runs that skip finished units report the time first spent on them.</p>")
        page.image("stage_timings.png", plot_timings(stats), "stage timings")

    def classes() -> None:
        counts = class_counts(recipe, store)
        if not counts:
            page.add("<p class='note'>No ingested train samples yet.</p>")
            return
        by_domain, by_class, shown = plot_class_counts(counts)
        page.image("domain_counts.png", by_domain, "samples per domain")
        page.image("class_counts.png", by_class, "samples per class")
        points = list(counts)
        rows = [{"domain / class": c, **{p: counts[p].get(c, 0) for p in points}}
                for c in sorted(set().union(*[set(v) for v in counts.values()]))]
        page.add(f"<details><summary>All {len(rows)} classes</summary>{_table(rows)}</details>")

    def scores() -> None:
        sc = scores_by_domain(recipe, store)
        if not sc:
            page.add("<p class='note'>Not scored (score stage disabled or not run).</p>")
            return
        page.image("clip_scores.png", plot_scores(sc, recipe.score.min_score), "CLIP score histograms")
        rows = []
        for d, v in sc.items():
            a = np.concatenate([v["kept"], v["dropped"]])
            rows.append({"domain": d, "scored": a.size, "kept": v["kept"].size, "dropped": v["dropped"].size,
                         "mean": float(a.mean()) if a.size else None,
                         "median": float(np.median(a)) if a.size else None})
        page.add(_table(rows))

    def mix() -> None:
        rep = _read_json(store.path(layout.MIX_REPORT))
        if rep is None:
            page.add("<p class='note'>Not mixed (mix stage disabled or not run): every kept sample appears once.</p>")
            return
        from .mix.report import summary_lines, table_rows

        page.add("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in summary_lines(rep)) + "</ul>")
        page.add(_table(table_rows(rep)))

    def grid() -> None:
        items = samples(store)
        if not items:
            page.add("<p class='note'>No shards written yet.</p>")
            return
        page.image("samples.png", plot_samples(items), "sample grid")
        page.add(_table([{"key": s.key, "domain": s.domain, "class": s.class_name, "score": s.score,
                          "caption": s.caption} for s in items]))

    def evaluation() -> None:
        res = _read_json(store.path(layout.EVAL_RESULTS))
        if res is None:
            page.add("<p class='note'>Not evaluated (eval stage disabled or not run).</p>")
            return
        if res.get("description_note"):
            page.add(f"<p>{_e(res['description_note'])}</p>")
        rows = res.get("rows") or res.get("mean") or []
        lead = [c for c in ("task", "classifier", "model", "images", "classes") if rows and c in rows[0]]
        page.add(_table(rows, lead + [c for c in (rows[0] if rows else []) if c not in lead]))
        png = store.path(layout.EVAL_PLOT)
        if png.is_file():
            page.image("eval_zero_shot.png", png.read_bytes(), "zero-shot accuracy")

    page.section("Stages", stages)
    page.section("Class counts: before filtering, after filtering, after mixing", classes)
    page.section("CLIP scores", scores)
    page.section("Mix: target vs realised", mix)
    page.section("Samples", grid)
    page.section("Zero-shot evaluation", evaluation)

    out_dir = store.path(layout.REPORT)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        if stale.name not in page.images:
            stale.unlink()
    written = []
    for name, png in page.images.items():
        write_bytes_atomic(out_dir / name, png)
        written.append(f"{layout.REPORT}/{name}")
    doc = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{_e(recipe.name)} report</title><style>{_CSS}</style></head><body>"
           + "\n".join(page.parts) + "</body></html>\n")
    index = store.path(layout.REPORT_INDEX)
    write_text_atomic(index, doc)
    log.info("report written to %s", index)
    return written + [layout.REPORT_INDEX]


# ----------------------------------------------------------------------------- CLI
def register_cli(app: Any) -> None:
    """Mount ``alive report OUT`` on the project's typer app."""
    import typer

    @app.command("report")
    def report_cmd(out: Path = typer.Argument(..., help="Run folder (the --out of alive build)."),
                   recipe: Optional[Path] = typer.Option(None, "--recipe", "-r",
                                                         help="Recipe YAML; default: the run's recipe.resolved.yaml.")) -> None:
        """(Re)write OUT/report/index.html from what the run folder holds."""
        from .recipe import load_recipe

        store = RunStore(out)
        try:
            r = load_recipe(recipe) if recipe else run_recipe(store)
        except RecipeError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2)
        typer.echo(f"report: {build(r, store)}")


__all__ = ["ReportStage", "build", "render", "run_recipe", "stage_stats", "class_counts", "scores_by_domain", "samples", "register_cli"]
