"""Eval: zero-shot classification of every ``role: eval`` source, base model vs fine-tuned model.

Each eval source is one task: its successfully ingested images and their class names. A class's
classifier is the mean of the L2-normalised text embeddings of its sentences, normalised again (CLIP's
prompt ensembling; CuPL when the sentences are the describe stage's class descriptions):

- ``template``: the hand-written prompts of ``prompts/templates.yaml`` (CLIP's standard baseline);
- ``descriptions``: the describe stage's kept sentences (template backend = the same baseline, and
  labelled so; an LLM backend = CuPL). A class without any falls back to its templates (counted);
- ``both``: the two sets together.

Any number of models can be compared (``run(..., models={name: folder})``, ``alive eval --model``):
the report puts them side by side per task and classifier, with each fine-tuned model's training
configuration (``clip``, ``dalip``, ``clip+dino``, ... from its ``train_summary.json``) and its gain
over ``base``. Writes ``eval/results.json``, ``eval/results.md`` and the bar chart ``eval/zero_shot.png``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ..describe.template import article, resolve_prompts_dir
from .. import layout
from ..executor import Stage, Unit, UnitContext, torch_resources
from ..recipe import Recipe
from ..stats import StageStats
from ..store import RunStore, atomic_path
from ..score.encoder import Encoder

log = logging.getLogger(__name__)
STAGE = "eval"
CODE_VERSION = "eval-v1"
MODEL_LABELS = {"base": "base", "finetuned": "fine-tuned"}


def classifier_label(kind: str, backend: Optional[str]) -> str:
    """How a classifier kind reads in the report: CuPL only when an LLM wrote the descriptions."""
    if kind == "template":
        return "template"
    if kind == "both":
        return "combined"
    return "CuPL" if backend not in (None, "template") else "descriptions (template baseline)"


def training_configuration(model: str) -> Optional[str]:
    """The objective a model folder was trained with (``train_summary.json``), or None (not trained here)."""
    p = Path(model) / "train_summary.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return doc.get("configuration") or "clip"  # summaries written before the objectives existed: plain CLIP


@dataclass
class Task:
    """One zero-shot task: the images of an eval source and the index of each one's class."""

    name: str
    domain: str
    classes: list[str]
    images: list[bytes]
    labels: np.ndarray
    failed_ingest: int = 0
    uids: list[str] = field(default_factory=list)


def load_task(recipe: Recipe, store: RunStore, source: str, limit: Optional[int] = None) -> Optional[Task]:
    """Read a source's ingest parts (status == success rows with a class name) as a task.

    Returns None (logged) when the source has no usable image; failed ingest rows are counted.
    """
    src = recipe.source(source)
    images: list[bytes] = []
    names: list[str] = []
    uids: list[str] = []
    failed = 0
    from ..ingest import ingested_parts

    for s, i in ingested_parts(store, recipe):
        if s != source:
            continue
        t = pq.read_table(store.path(layout.ingest_part(s, i)), columns=["uid", "image", "class_name", "status"])
        ok = pc.and_(pc.equal(t["status"], "success"), pc.is_valid(t["class_name"]))
        failed += t.num_rows - int(pc.sum(ok).as_py() or 0)
        t = t.filter(ok)
        images += t["image"].to_pylist()
        names += t["class_name"].to_pylist()
        uids += t["uid"].to_pylist()
        if limit is not None and len(images) >= limit:
            images, names, uids = images[:limit], names[:limit], uids[:limit]
            break
    if not images:
        log.warning("eval: source %s has no successfully ingested labelled image (run ingest first); skipped", source)
        return None
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return Task(source, src.domain, classes, images, np.array([index[n] for n in names], np.int64), failed, uids)


def load_templates(recipe: Recipe) -> tuple[dict[str, list[str]], str]:
    """Per-domain prompt templates and the file's sha (recorded with the results)."""
    import hashlib

    path = resolve_prompts_dir(recipe.describe.prompts) / "templates.yaml"
    raw = path.read_bytes()
    doc = yaml.safe_load(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("templates"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'templates' key of per-domain prompt lists")
    return doc["templates"], hashlib.sha256(raw).hexdigest()[:16]


def template_sentences(templates: dict[str, list[str]], domain: str, class_name: str) -> list[str]:
    """The domain's prompts (the 'general' ones when the domain has none) filled with the class name."""
    tpls = templates.get(domain) or templates.get("general") or ["a photo of {a_class}."]
    return [t.format(**{"class": class_name, "a_class": f"{article(class_name)} {class_name}"}) for t in tpls]


def load_descriptions(store: RunStore) -> tuple[dict[tuple[str, str], list[str]], Optional[str]]:
    """Kept describe sentences per (domain, class) and the backend that wrote them ({} / None if none)."""
    from ..describe import load_kept

    p = store.path(layout.DESCRIPTIONS)
    if not p.exists():
        return {}, None
    backends = pc.unique(pq.read_table(p, columns=["backend"])["backend"]).to_pylist()
    return load_kept(store), "+".join(sorted(b for b in backends if b))


def class_sentences(kind: str, task: Task, templates: dict[str, list[str]],
                    descriptions: dict[tuple[str, str], list[str]]) -> tuple[list[list[str]], int]:
    """Sentences per class of ``task`` for a classifier kind, and how many classes fell back to templates."""
    out, fallback = [], 0
    for c in task.classes:
        tpl = template_sentences(templates, task.domain, c)
        desc = descriptions.get((task.domain, c), [])
        if kind != "template" and not desc:
            fallback += 1
        if kind == "template":
            out.append(tpl)
        elif kind == "descriptions":
            out.append(desc or tpl)
        else:
            out.append(list(dict.fromkeys(tpl + desc)))
    return out, fallback


def class_weights(sentences: list[list[str]], text_emb: dict[str, np.ndarray]) -> np.ndarray:
    """[classes, dim]: mean of each class's normalised sentence embeddings, re-normalised."""
    w = np.stack([np.mean([text_emb[s] for s in ss], axis=0) for ss in sentences]).astype(np.float32)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Share of rows whose label is among the k highest logits (k capped at the class count)."""
    if len(labels) == 0:
        return {k: float("nan") for k in ks}
    order = np.argsort(-logits, axis=1, kind="stable")
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        out[k] = float(np.mean(np.any(order[:, :kk] == labels[:, None], axis=1)))
    return out


def default_models(recipe: Recipe, store: RunStore) -> dict[str, str]:
    """``base`` (eval.base_model, else train.model or the from_config init) and ``finetuned`` if trained."""
    base = recipe.eval.base_model
    if base is None:
        base_dir = store.path(layout.TRAIN_BASE)
        base = str(base_dir) if recipe.train.from_config is not None and base_dir.exists() else recipe.train.model
    models = {"base": base}
    final = store.path(layout.TRAIN_FINAL)
    if (final / "config.json").exists():
        models["finetuned"] = str(final)
    else:
        log.warning("eval: no fine-tuned model at %s (run `alive train` first); evaluating the base model only", final)
    return models


def _model_identity(name: str) -> Any:
    """Folder contents' sizes and mtimes for a local model (retrained = new identity); a hub id as is."""
    p = Path(name)
    if not p.is_dir():
        return name
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir())
            if f.suffix in (".safetensors", ".json", ".bin")]


def _eval_model(enc: Encoder, tasks: list[Task], kinds: list[str], templates: dict[str, list[str]],
                descriptions: dict[tuple[str, str], list[str]], stats: StageStats) -> list[dict[str, Any]]:
    """Zero-shot rows of one model: the scorer's encoder (same preprocessing, precision and text batches)."""
    rows = []
    for task in tasks:
        per_kind = {k: class_sentences(k, task, templates, descriptions) for k in kinds}
        uniq = sorted({s for sents, _ in per_kind.values() for ss in sents for s in ss})
        text_emb = dict(zip(uniq, enc.encode_texts(uniq)))
        img, errors = enc.encode_images(task.images)
        ok = np.array([e is None for e in errors], dtype=bool)
        bad = int((~ok).sum())
        if bad:
            stats.drop("failed_to_decode", bad, example=f"{task.name}: {bad} image(s)")
        labels = task.labels[ok]
        for kind in kinds:
            sents, fallback = per_kind[kind]
            acc = topk_accuracy(img @ class_weights(sents, text_emb).T, labels)
            rows.append({"task": task.name, "domain": task.domain, "classifier": kind, "top1": acc[1], "top5": acc[5],
                         "n_images": int(ok.sum()), "n_classes": len(task.classes),
                         "sentences": int(sum(len(s) for s in sents)), "fallback_classes": fallback})
    return rows


def run(recipe: Recipe, store: RunStore, models: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run the eval stage (skipped when done with these models and inputs); returns the results document.

    Args:
        recipe: The run's recipe (eval sources, eval settings, prompts folder).
        store: The run store (ingest parts of the eval sources, descriptions, train/final).
        models: name -> hub id or folder; default ``eval.models``, else :func:`default_models`.

    Returns:
        The results document (also written to ``eval/results.json``) with ``rows``: one row per task
        and classifier (plus the means), the models side by side, for a table artifact.

    Raises:
        ValueError: the recipe has no eval source with ingested images.
    """
    from ..executor import run_stages

    if models:
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"models": dict(models)})})
    rep = run_stages(recipe, store, [STAGE])[STAGE]
    return {**json.loads(store.path(layout.EVAL_RESULTS).read_text()), "skipped": not rep.plan.pending}


def _inside(store: RunStore, path: str) -> Optional[Path]:
    p = Path(path).resolve()
    return p if p.is_dir() and (p == store.root or store.root in p.parents) else None


class EvalStage(Stage):
    """One unit: every eval source's ingested images x every model x every classifier kind."""

    name = STAGE

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.eval.enabled

    def resources(self, recipe: Recipe, threads: int, gpus_available: bool) -> dict[str, float]:
        return torch_resources(recipe.eval.device, threads, gpus_available)

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        from ..ingest import ingested_parts

        cfg = recipe.eval
        eval_sources = [s.name for s in recipe.sources if s.role == "eval"]
        if not eval_sources:
            raise ValueError("eval: the recipe has no source with role: eval (add a labelled source marked role: eval)")
        models = dict(cfg.models) if cfg.models else default_models(recipe, store)
        _, tpl_sha = load_templates(recipe)
        inputs = [layout.ingest_part(s, i) for s, i in ingested_parts(store, recipe, role="eval")]
        if store.path(layout.DESCRIPTIONS).is_file():
            inputs.append(layout.DESCRIPTIONS)
        identity = {}
        for name, path in sorted(models.items()):
            local = _inside(store, path)
            if local is None:  # a hub id or a folder outside the run: its name, sizes and mtimes
                identity[name] = _model_identity(path)
            else:  # a model of this run (train/final, train/base): its files' digests
                identity[name] = local.relative_to(store.root).as_posix()
                inputs += sorted(f.relative_to(store.root).as_posix() for f in local.rglob("*") if f.is_file())
        config = {"eval": [CODE_VERSION, cfg.model_dump(mode="json", exclude={"device", "enabled", "models"}),
                           tpl_sha, identity]}
        return [Unit("all", config=config, inputs=tuple(inputs), payload=(eval_sources, models))]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        eval_sources, models = unit.payload
        doc = _evaluate(ctx.recipe, ctx.store, eval_sources, models, ctx.stats)
        doc["fingerprint"] = ctx.fingerprint
        doc["rows"] = side_by_side(doc)
        ctx.write_json(layout.EVAL_RESULTS, doc)
        with ctx.output(layout.EVAL_MARKDOWN) as tmp:
            tmp.write_text(markdown(doc), encoding="utf-8")
        plot(doc, ctx.path(layout.EVAL_PLOT))
        ctx.record(layout.EVAL_PLOT)


def _evaluate(recipe: Recipe, store: RunStore, eval_sources: list[str], models: dict[str, str],
              stats: StageStats) -> dict[str, Any]:
    cfg = recipe.eval
    templates, tpl_sha = load_templates(recipe)
    descriptions, desc_backend = load_descriptions(store)
    kinds = list(cfg.classifiers)
    if not descriptions and any(k != "template" for k in kinds):
        log.warning("eval: no describe/descriptions.parquet; the descriptions classifiers use the templates")
    tasks = [t for t in (load_task(recipe, store, s, cfg.max_per_task) for s in eval_sources) if t is not None]
    if not tasks:
        raise ValueError(f"eval: no eval source has ingested images ({eval_sources}); run ingest first")
    stats.total = sum(len(t.images) for t in tasks)
    results = []
    for name, path in models.items():
        enc = Encoder(path, cfg.device, "auto", cfg.batch_size)  # not the cached one: train/final changes
        for r in _eval_model(enc, tasks, kinds, templates, descriptions, stats):
            results.append({"model": name, **r})
        del enc
    stats.kept = sum(r["n_images"] for r in results if r["model"] == next(iter(models)) and r["classifier"] == kinds[0])
    stats.add("tasks", len(tasks))
    doc = {
        "models": models, "configurations": {k: training_configuration(v) for k, v in models.items()},
        "classifiers": kinds, "classifier_labels": {k: classifier_label(k, desc_backend) for k in kinds},
        "description_backend": desc_backend,
        "description_note": _desc_note(desc_backend), "templates_sha": tpl_sha,
        "tasks": [{"task": t.name, "domain": t.domain, "n_images": len(t.images), "n_classes": len(t.classes),
                   "chance_top1": 1 / len(t.classes), "failed_ingest": t.failed_ingest, "classes": t.classes}
                  for t in tasks],
        "results": results, "mean": _means(results),
    }
    return doc


def _desc_note(backend: Optional[str]) -> str:
    if backend is None:
        return "no class descriptions: the descriptions classifiers fell back to the templates"
    if backend == "template":
        return "descriptions from the template backend: CLIP's hand-written baseline, no LLM"
    return f"descriptions from the {backend} backend (CuPL: mean of normalised sentence embeddings)"


def _means(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(r["model"], r["classifier"]) for r in results}, key=lambda k: (k[0], k[1]))
    for m, c in keys:
        rs = [r for r in results if r["model"] == m and r["classifier"] == c]
        out.append({"model": m, "classifier": c, "top1": float(np.mean([r["top1"] for r in rs])),
                    "top5": float(np.mean([r["top5"] for r in rs])), "tasks": len(rs)})
    return out


def side_by_side(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, classifier) plus the means, with each model's top-1/top-5 as columns."""
    names = list(doc["models"])
    cell = {(r["model"], r["task"], r["classifier"]): r for r in doc["results"]}
    cell.update({(r["model"], "mean", r["classifier"]): r for r in doc["mean"]})
    info = {t["task"]: t for t in doc["tasks"]}
    rows = []
    for task in [t["task"] for t in doc["tasks"]] + ["mean"]:
        for kind in doc["classifiers"]:
            row: dict[str, Any] = {"task": task, "classifier": kind,
                                   "images": info[task]["n_images"] if task in info else None,
                                   "classes": info[task]["n_classes"] if task in info else None}
            for m in names:
                r = cell.get((m, task, kind))
                row[f"{m}_top1"] = r["top1"] if r else None
                row[f"{m}_top5"] = r["top5"] if r else None
            for m in names:
                if m != "base" and "base" in names and row["base_top1"] is not None and row[f"{m}_top1"] is not None:
                    row[f"{m}_delta_top1"] = row[f"{m}_top1"] - row["base_top1"]
            if "finetuned_delta_top1" in row:
                row["delta_top1"] = row["finetuned_delta_top1"]
            rows.append(row)
    return rows


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    """The side-by-side table as markdown (accuracies in %; one Δ column per model against ``base``)."""
    names = list(doc["models"])
    label = {m: MODEL_LABELS.get(m, m) for m in names}
    head = ["task", "classifier", "images", "classes"] + [f"{label[m]} top-1" for m in names]
    deltas = [m for m in names if m != "base"] if "base" in names else []
    head += ["Δ top-1" if len(deltas) == 1 else f"Δ {label[m]} top-1" for m in deltas]
    head += [f"{label[m]} top-5" for m in names]
    kind_label = doc.get("classifier_labels", {})
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in doc["rows"]:
        cells = [("**mean**" if r["task"] == "mean" else r["task"]), kind_label.get(r["classifier"], r["classifier"]),
                 "" if r["images"] is None else str(r["images"]), "" if r["classes"] is None else str(r["classes"])]
        cells += [_pct(r[f"{m}_top1"]) for m in names]
        cells += [_pct(r.get(f"{m}_delta_top1"), signed=True) for m in deltas]
        cells += [_pct(r[f"{m}_top5"]) for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    conf = doc.get("configurations", {})
    models = "; ".join(f"{label[m]} = `{p}`" + (f" (trained: {conf[m]})" if conf.get(m) else "")
                       for m, p in doc["models"].items())
    return (f"# Zero-shot classification\n\nModels: {models}.\n\nClassifiers: {', '.join(doc['classifiers'])} "
            f"({doc['description_note']}).\n\n" + "\n".join(lines) + "\n")


def plot(doc: dict[str, Any], dest: Path) -> None:
    """Grouped bars of top-1 per task (and the mean), one panel per classifier, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["models"])
    kinds = doc["classifiers"]
    tasks = [t["task"] for t in doc["tasks"]] + ["mean"]
    by = {(r["task"], r["classifier"]): r for r in doc["rows"]}
    fig, axes = plt.subplots(1, len(kinds), figsize=(max(4.0, 1.2 * len(tasks)) * len(kinds), 3.6), squeeze=False,
                             sharey=True)
    width = 0.8 / len(names)
    x = np.arange(len(tasks))
    for ax, kind in zip(axes[0], kinds):
        for i, m in enumerate(names):
            vals = [100 * (by[(t, kind)][f"{m}_top1"] or 0.0) for t in tasks]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=MODEL_LABELS.get(m, m))
        chance = [100 * t["chance_top1"] for t in doc["tasks"]]
        if chance:
            ax.axhline(float(np.mean(chance)), color="grey", lw=0.8, ls="--", label="chance (mean)")
        ax.set_xticks(x, tasks, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"classifier: {doc.get('classifier_labels', {}).get(kind, kind)}", fontsize=9)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("zero-shot top-1 (%)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
