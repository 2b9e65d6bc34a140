"""Dataset card (shards/hf/README.md): YAML header for `datasets` + a human summary."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import yaml

from ..recipe import Recipe
from ..store import RunStore, write_text_atomic
from .hf import hf_features

METHOD_CITATIONS = {
    "AgriCLIP (ALive)": "Nawaz et al., AgriCLIP: Adapting CLIP for Agriculture and Livestock via Domain-Specialized "
                        "Cross-Model Alignment, COLING 2025.",
    "CuPL": "Pratt et al., What does a platypus look like? Generating customized prompts for zero-shot image "
            "classification, ICCV 2023.",
    "DALIP (PlantMix-13M)": "DALIP: Distribution Alignment-based Language-Image Pre-Training for Domain-Specific Data, 2025.",
    "Data Mixing Laws": "Ye et al., Data Mixing Laws: Optimizing Data Mixtures by Predicting Language Modeling "
                        "Performance, 2024.",
    "MetaCLIP": "Xu et al., Demystifying CLIP Data, ICLR 2024.",
    "DataComp": "Gadre et al., DataComp: In search of the next generation of multimodal datasets, NeurIPS 2023.",
}


def _counts(store: RunStore) -> tuple[int, Counter, Counter, Counter, Counter]:
    order = pq.read_table(store.path("write", "order.parquet"), columns=["uid"])
    sel = pq.read_table(store.path("write", "selection.parquet"), columns=["uid", "source", "domain", "class_name",
                                                                          "caption_source"])
    t = order.join(sel, "uid", join_type="inner")
    return (t.num_rows, Counter(t["source"].to_pylist()), Counter(t["domain"].to_pylist()),
            Counter(f"{d} / {c}" for d, c in zip(t["domain"].to_pylist(), t["class_name"].to_pylist())),
            Counter(t["caption_source"].to_pylist()))


def _data_bytes(store: RunStore) -> int:
    return sum(p.stat().st_size for p in store.path("shards", "hf", "data").glob("train-*.parquet"))


def _licence_id(recipe: Recipe) -> str:
    lic = {s.licence for s in recipe.sources if s.role == "train"}
    return lic.pop().lower() if len(lic) == 1 and None not in lic else "other"


def card_text(recipe: Recipe, store: RunStore, models: dict[str, str]) -> str:
    n, by_source, by_domain, by_class, by_caption = _counts(store)
    n_files = len(list(store.path("shards", "hf", "data").glob("train-*.parquet")))
    header = {
        "license": _licence_id(recipe),
        "task_categories": ["zero-shot-image-classification", "image-to-text"],
        "tags": ["agriculture", "livestock", "fishery", "clip", "image-text"],
        "pretty_name": f"{recipe.name} (built by the ALive dataset factory)",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {
            "features": [{"name": k, **({"dtype": "image"} if v.get("_type") == "Image" else {"dtype": v["dtype"]})}
                         for k, v in hf_features().items()],
            "splits": [{"name": "train", "num_examples": n, "num_bytes": _data_bytes(store)}],
        },
    }
    synthetic = [s.name for s in recipe.sources if s.kind == "synthetic"]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "", f"# {recipe.name}", ""]
    if synthetic:
        lines += [f"> **Synthetic data.** Sources {', '.join(synthetic)} are procedurally drawn images "
                  "(demo/test data), not photographs.", ""]
    if models.get("untrained"):
        lines += ["> **Tiny untrained models.** The models below were built locally with random weights; "
                  "their captions/scores carry no meaning.", ""]
    lines += [
        f"{n} image-text pairs in {n_files} parquet file(s) (`data/`), also written as webdataset shards.",
        "",
        f"- recipe hash: `{recipe.sha}` (seed {recipe.seed}, image size {recipe.image_size})",
        f"- caption backend: {models.get('describe', 'template')}",
        f"- CLIP scoring model: {models.get('score', 'none (scoring disabled)')}",
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/or/repo-id", split="train")',
        "```",
        "",
        "## Composition",
        "",
        "| domain | pairs | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {d} | {c} | {c / max(n, 1):.2%} |" for d, c in sorted(by_domain.items())]
    lines += ["", "| caption source | pairs |", "|---|---:|"]
    lines += [f"| {k} | {c} |" for k, c in sorted(by_caption.items())]
    if by_caption.get("template"):
        lines += ["", "`template` captions are the hand-written CLIP template baseline, not LLM descriptions."]
    lines += ["", "## Sources", "", "| source | domain | kind | pairs | licence | citation |", "|---|---|---|---:|---|---|"]
    for s in recipe.sources:
        if s.role != "train":
            continue
        ident = getattr(s, "id", None) or getattr(s, "path", None) or "synthetic"
        if s.kind in ("imagefolder", "parquet", "webdataset", "urls"):
            ident = "local files"
        lines.append(f"| {s.name} ({ident}) | {s.domain} | {s.kind} | {by_source.get(s.name, 0)} | "
                     f"{s.licence or 'unknown'} | {(s.citation or '').replace('|', '/')} |")
    evals = [s.name for s in recipe.sources if s.role == "eval"]
    if evals:
        lines += ["", f"Eval-only sources (never in this data; near-duplicates removed): {', '.join(evals)}."]
    lines += ["", "## Classes", "", "| domain / class | pairs |", "|---|---:|"]
    lines += [f"| {k} | {c} |" for k, c in sorted(by_class.items())]
    lines += ["", "## Methods cited", ""] + [f"- {k}: {v}" for k, v in METHOD_CITATIONS.items()]
    return "\n".join(lines) + "\n"


def write_card(recipe: Recipe, store: RunStore, models: dict[str, str]) -> None:
    write_text_atomic(store.path("shards", "hf", "README.md"), card_text(recipe, store, models))
