"""Dataset card (shards/hf/README.md): metadata through huggingface_hub's DatasetCardData + a human summary.

The YAML header is what the Hub and ``datasets`` read: licence fields (``license_name``/``license_link``
when the licence is not one of the Hub's identifiers), ``size_categories``, ``task_categories``, the
data files of the default config, and ``dataset_info`` with the split's ``num_examples``/``num_bytes``
(in-memory size), ``download_size`` (the parquet files) and ``dataset_size``. Everything in it derives
from the run's files, so the same run gives the same card bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData

from .. import layout
from ..recipe import Recipe
from ..store import RunStore, write_text_atomic
from .hf import hf_features

# Licence identifiers the Hub knows (https://huggingface.co/docs/hub/repositories-licenses); any other
# licence becomes `license: other` with license_name + license_link.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib
pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown
""".split())
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B")]
TASK_CATEGORIES = ["zero-shot-image-classification", "image-to-text", "text-to-image"]

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
    order = pq.read_table(store.path(layout.WRITE_ORDER), columns=["uid"])
    sel = pq.read_table(store.path(layout.WRITE_SELECTION), columns=["uid", "source", "domain", "class_name",
                                                                          "caption_source"])
    t = order.join(sel, "uid", join_type="inner")
    return (t.num_rows, Counter(t["source"].to_pylist()), Counter(t["domain"].to_pylist()),
            Counter(f"{d} / {c}" for d, c in zip(t["domain"].to_pylist(), t["class_name"].to_pylist())),
            Counter(t["caption_source"].to_pylist()))


def _data_files(store: RunStore) -> list[Path]:
    return sorted(store.path(layout.HF_DATA).glob("train-*.parquet"))


def split_sizes(files: list[Path]) -> tuple[int, int]:
    """(num_bytes, download_size) of a split: uncompressed data size (row groups) and parquet file bytes."""
    num_bytes = 0
    for p in files:
        md = pq.ParquetFile(p).metadata
        num_bytes += sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    return num_bytes, sum(p.stat().st_size for p in files)


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for ``n`` examples."""
    return next((label for bound, label in SIZE_CATEGORIES if n < bound), "n>10B")


def licence_fields(recipe: Recipe) -> dict[str, Any]:
    """``license`` (+ ``license_name``/``license_link`` for ``other``) from the train sources' licences.

    Hub identifiers only: ``license`` is that identifier (or the sorted list of them). Any source with a
    missing or non-Hub licence makes it ``other``, named, and linked to the card's source table.
    """
    ids = sorted({(s.licence or "").strip().lower() for s in recipe.sources if s.role == "train"})
    if ids and all(i in HUB_LICENSES for i in ids):
        return {"license": ids[0] if len(ids) == 1 else ids}
    return {"license": "other", "license_name": "per-source-licences", "license_link": "README.md#sources"}


def card_data(recipe: Recipe, store: RunStore, n: int) -> DatasetCardData:
    """The card's metadata (YAML header), as the Hub reads it."""
    num_bytes, download_size = split_sizes(_data_files(store))
    return DatasetCardData(
        **licence_fields(recipe),
        language=["en"],
        annotations_creators=["machine-generated"],
        size_categories=[size_category(n)],
        task_categories=TASK_CATEGORIES,
        pretty_name=f"{recipe.name} (built by the ALive dataset factory)",
        tags=["agriculture", "livestock", "fishery", "clip", "image-text"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        dataset_info={
            "features": [{"name": k, **({"dtype": "image"} if v.get("_type") == "Image" else {"dtype": v["dtype"]})}
                         for k, v in hf_features().items()],
            "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": n}],
            "download_size": download_size,
            "dataset_size": num_bytes,
        },
    )


def shard_sizes(store: RunStore) -> dict[str, int]:
    """``sizes.json`` of the webdataset shards ({} when the run wrote none)."""
    p = store.path(layout.SIZES)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def open_clip_section(sizes: dict[str, int], shard_dir: str, fetch: Optional[list[str]] = None) -> list[str]:
    """Card lines: train open_clip on the webdataset shards with a command that works as written.

    Args:
        sizes: shard file name -> samples (sizes.json).
        shard_dir: the local folder holding the tars, as the command sees it. open_clip looks for
            sizes.json only next to local shards, and stops without it, so the command also passes
            ``--train-num-samples``.
        fetch: shell lines that bring the shards to ``shard_dir`` first (e.g. ``hf download``).
    """
    if not sizes:
        return []
    names = sorted(sizes)
    first, last = names[0][:-4], names[-1][:-4]
    pattern = f"{shard_dir}/{first}.tar" if first == last else f"{shard_dir}/{{{first}..{last}}}.tar"
    n_shards, n = len(names), sum(sizes.values())
    workers = min(4, n_shards)
    # open_clip runs floor(n / batch) batches split over the workers: at least one batch per worker
    batch = max(1, min(128, n // workers))
    return [
        "", "## Train with open_clip", "",
        f"The same {n} pairs as {n_shards} webdataset shard(s) (`{{key}}.jpg`, `{{key}}.txt`, `{{key}}.json` per "
        "sample; `sizes.json` gives the count per shard):", "",
        "```bash",
        *(fetch or ["# from the run folder (the --out of alive build)"]),
        "pip install 'open_clip_torch[training]'",
        f"python -m open_clip_train.main --dataset-type webdataset --train-data '{pattern}' \\",
        f"    --train-num-samples {n} --workers {workers} --batch-size {batch} --epochs 1 \\",
        "    --model ViT-B-32 --pretrained openai --lr 1e-5 --warmup 100",
        "```", "",
        "open_clip gives every data-loader worker of every GPU whole shards: keep `--workers` x GPUs at or below "
        f"the number of shards ({n_shards} here), or write smaller shards (`write.samples_per_shard`).",
    ]


def card_text(recipe: Recipe, store: RunStore, models: dict[str, str], *, shard_dir: Optional[str] = "shards/wds",
              fetch: Optional[list[str]] = None) -> str:
    """The dataset card as text.

    Args:
        recipe: the run's recipe.
        store: the finished run (write stage done).
        models: the models used per step (summary.json's ``models``).
        shard_dir: where the open_clip command finds the webdataset shards (default: from the run folder;
            None: no open_clip section, for a card whose repo holds no shards).
        fetch: shell lines that bring the shards there first (the uploaded card downloads them).
    """
    n, by_source, by_domain, by_class, by_caption = _counts(store)
    n_files = len(_data_files(store))
    synthetic = [s.name for s in recipe.sources if s.kind == "synthetic"]
    lines = ["---", card_data(recipe, store, n).to_yaml(), "---", "", f"# {recipe.name}", ""]
    if synthetic:
        lines += [f"> **Synthetic data.** Sources {', '.join(synthetic)} are procedurally drawn images "
                  "(demo/test data), not photographs.", ""]
    if models.get("untrained"):
        lines += ["> **Tiny untrained models.** The models below were built locally with random weights; "
                  "their captions/scores carry no meaning.", ""]
    lines += [
        f"{n} image-text pairs in {n_files} parquet file(s) (`data/`)"
        + (", also written as webdataset shards." if "webdataset" in recipe.write.formats else "."),
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
    if shard_dir is not None:
        lines += open_clip_section(shard_sizes(store), shard_dir, fetch)
    lines += ["", "## Methods cited", ""] + [f"- {k}: {v}" for k, v in METHOD_CITATIONS.items()]
    return str(DatasetCard("\n".join(lines) + "\n"))


def write_card(recipe: Recipe, store: RunStore, models: dict[str, str]) -> None:
    write_text_atomic(store.path(layout.HF_CARD), card_text(recipe, store, models))


def read_card(path: Path) -> DatasetCard:
    """Parse a dataset card with huggingface_hub; ValueError naming the file when it has no metadata."""
    card = DatasetCard.load(path)
    if not card.data.to_dict():
        raise ValueError(f"{path}: the dataset card has no YAML metadata (--- ... ---) at the top")
    return card
