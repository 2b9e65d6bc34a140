"""Hugging Face datasets (Hub id or local folder): planned from metadata, read inside the ingest units.

The planner never streams the data. It resolves the dataset's builder and data files
(``datasets.load_dataset_builder``), takes the features from the card's ``dataset_info`` (or a
parquet footer, or the folder layout), and cuts parts:

- parquet data files (most Hub datasets, and every Hub parquet conversion): row subsets of each
  file, read by row group inside the unit; only the label column is read at plan time, and only
  when the label filters, stratified sampling or ``class_names`` need it;
- image folders: the image files, labelled by their class folder;
- ``save_to_disk`` folders: row subsets of the memory-mapped dataset (``Dataset.select``);
- anything else: one unit per data-file shard (``IterableDataset.shard``), labels filtered as read.

A dataset that is only a loading script (``datasets`` >= 4 no longer runs them) is an error that
names the ways out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..recipe import HFSource, fingerprint
from .base import PartSpec, RawSample, SourceError
from .files import ParquetColumns, image_cell_bytes, parquet_file, plan_parquet_files
from .select import Entry, check_label_names, chunk, excluded_args, has_label_filter, require_rows, select

_LABEL_NAMES = ("label", "labels", "class", "class_name", "category", "species", "breed", "disease", "name")


@dataclass
class HFView:
    """What planning and ``alive sources inspect`` need to know about an hf source, from metadata only."""

    builder: str  # parquet | imagefolder | disk | <other datasets builder name>
    features: Any
    data_files: list[str] = field(default_factory=list)
    num_rows: Optional[int] = None
    configs: list[str] = field(default_factory=list)
    licence: Optional[str] = None
    disk_path: Optional[str] = None


def script_error(src: HFSource, detail: str) -> SourceError:
    return SourceError(
        f"source {src.name!r}: {src.id} is a loading script ({detail}); datasets >= 4 no longer runs loading "
        "scripts. Ways out: the Hub's parquet conversion, if the dataset viewer made one (revision: "
        "refs/convert/parquet); convert it once where the script still runs (datasets < 4: load_dataset(...)"
        ".to_parquet(...)) and use kind: parquet; or list the image URLs with their labels and use kind: urls"
    )


def _offline_hint() -> str:
    return (" (HF_HUB_OFFLINE=1 is set: only local folders and cached datasets load)"
            if os.environ.get("HF_HUB_OFFLINE") == "1" else "")


def _is_disk_folder(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _load_disk(src: HFSource):
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(src.id)
    if isinstance(ds, DatasetDict):
        if src.split not in ds:
            raise SourceError(f"source {src.name!r}: {src.id} has no split {src.split!r}; its splits are "
                              f"{sorted(ds)} (fix 'split')")
        ds = ds[src.split]
    return ds


def _card_licence(src: HFSource) -> Optional[str]:
    """The licence in the dataset card's YAML (None when there is no card or it cannot be fetched)."""
    try:
        from huggingface_hub import DatasetCard

        local = Path(src.id) / "README.md"
        card = DatasetCard.load(str(local)) if local.is_file() else DatasetCard.load(src.id)
        lic = card.data.get("license")
        return ", ".join(lic) if isinstance(lic, list) else lic
    except Exception:  # no card, offline, private: the recipe's licence (if any) stands
        return None


def open_view(src: HFSource, want_licence: bool = False) -> HFView:
    """Resolve an hf source from metadata: builder, data files of the split, features, row count."""
    import datasets

    if _is_disk_folder(src.id):
        ds = _load_disk(src)
        return HFView("disk", ds.features, num_rows=ds.num_rows, disk_path=src.id,
                      licence=_card_licence(src) if want_licence else None)
    try:
        builder = datasets.load_dataset_builder(src.id, src.config, revision=src.revision)
    except RuntimeError as e:
        if "scripts are no longer supported" in str(e):
            raise script_error(src, str(e)) from None
        raise SourceError(f"source {src.name!r}: cannot load {src.id!r}: {e}{_offline_hint()}") from None
    except ValueError as e:
        if "Config name is missing" in str(e):
            configs = datasets.get_dataset_config_names(src.id, revision=src.revision)
            raise SourceError(f"source {src.name!r}: {src.id} has several configs {configs}; pick one with "
                              "'config' in the recipe") from None
        raise SourceError(f"source {src.name!r}: cannot load {src.id!r} (config {src.config!r}): {e}"
                          f"{_offline_hint()}") from None
    except Exception as e:  # datasets raises many types; all mean "cannot load this source"
        scripts = sorted(p.name for p in Path(src.id).glob("*.py")) if Path(src.id).is_dir() else []
        if scripts:  # datasets only names a script called after its folder; any script and no data is the same case
            raise script_error(src, f"found {', '.join(scripts)} and no data files") from None
        raise SourceError(f"source {src.name!r}: cannot load {src.id!r} split {src.split!r}: {e}"
                          f"{_offline_hint()}") from None
    data_files = builder.config.data_files or {}
    if src.split not in data_files:
        raise SourceError(f"source {src.name!r}: {src.id} (config {builder.config.name!r}) has no split "
                          f"{src.split!r}; its splits are {sorted(str(k) for k in data_files)} (fix 'split')")
    files = [str(f) for f in data_files[src.split]]
    name = builder.name
    features = builder.info.features
    if features is None and name == "parquet" and files:
        features = datasets.Features.from_arrow_schema(parquet_file(files[0]).schema_arrow)
    if features is None:  # image folders infer labels from the layout when the dataset is opened
        stream = _load_stream(src)
        features = stream.features or stream._resolve_features().features
    splits = builder.info.splits or {}
    num_rows = splits[src.split].num_examples if src.split in splits else None
    return HFView(name, features, files, num_rows or None, licence=_card_licence(src) if want_licence else None)


def _load_stream(src: HFSource):
    from datasets import load_dataset

    try:
        return load_dataset(src.id, src.config, split=src.split, revision=src.revision, streaming=True)
    except Exception as e:  # datasets raises many types; all mean "cannot load this source"
        raise SourceError(f"source {src.name!r}: cannot load {src.id!r} split {src.split!r}: {e}"
                          f"{_offline_hint()}") from None


def detect_columns(features: Any, src: HFSource) -> tuple[str, Optional[str], Any]:
    """Pick the image and label columns from the dataset features (recipe overrides win).

    Returns (image column, label column or None, ClassLabel feature or None).
    """
    from datasets import ClassLabel, Image, Value

    if features is None:
        raise SourceError(
            f"source {src.name!r}: {src.id} exposes no features; set image_column and label_column in the recipe"
        )
    names = list(features)
    image_col = src.image_column or next((c for c in names if isinstance(features[c], Image)), None)
    if image_col is None or image_col not in features:
        raise SourceError(
            f"source {src.name!r}: no image column in {src.id} (columns: {names}); set image_column in the recipe"
        )
    if src.fixed_label is not None:
        label_col = None
    elif src.label_column:
        if src.label_column not in features:
            raise SourceError(f"source {src.name!r}: label_column {src.label_column!r} not in {src.id} (columns: {names})")
        label_col = src.label_column
    elif src.caption_column:
        label_col = None
    else:
        label_col = next((c for c in names if isinstance(features[c], ClassLabel)), None)
        if label_col is None:
            strings = [c for c in names if isinstance(features[c], Value) and features[c].dtype in ("string", "large_string")]
            label_col = next((c for c in strings if c.lower() in _LABEL_NAMES), None)
        if label_col is None:
            only = " has an image column only" if names == [image_col] else " has no label column"
            raise SourceError(
                f"source {src.name!r}: {src.id}{only} (columns: {names}); set label_column, or fixed_label for a "
                "single-class image set, or caption_column for image-text data, or leave the source out"
            )
    if src.caption_column and src.caption_column not in features:
        raise SourceError(f"source {src.name!r}: caption_column {src.caption_column!r} not in {src.id} (columns: {names})")
    cl = features[label_col] if label_col and isinstance(features[label_col], ClassLabel) else None
    return image_col, label_col, cl


def _rel_id(path: str, root: str) -> str:
    """A data file's path inside its dataset (the Hub URL's part after 'id@revision/')."""
    if "://" in path:
        tail = path.split("://", 1)[1]
        return tail.split("/", 3)[-1] if "@" in tail else tail
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path


def _entry_parts(src: HFSource, entries: list[Entry], part_size: int, seed: int, reader: str,
                 args: dict[str, Any], fp_base: str, where: str) -> list[PartSpec]:
    kept, excluded = select(entries, src, seed)
    require_rows(src, kept, excluded, where)
    parts = []
    for i, (ck, cx) in enumerate(chunk(entries, kept, excluded, part_size)):
        ex = excluded_args(cx)
        refs = [e.ref for e in ck]
        a = {**args, "rows" if reader == "hf_disk" else "entries": (
            refs if reader == "hf_disk" else [(r, e.label) for r, e in zip(refs, ck)]),
            "ids": [e.orig_id for e in ck], "labels": [e.label for e in ck], "excluded": ex}
        parts.append(PartSpec(src.name, i, reader, a, fingerprint(fp_base, i, refs, a["ids"], a["labels"], ex),
                              len(ck)))
    return parts


def plan(src: HFSource, part_size: int, spool_dir: Path, seed: int = 0) -> list[PartSpec]:
    from datasets import Image

    view = open_view(src)
    image_col, label_col, cl = detect_columns(view.features, src)
    names = list(cl.names) if cl is not None else None
    base = fingerprint(src, "hf-v2")
    where = f"{src.id} split {src.split!r}"
    if view.builder == "parquet":
        cols = ParquetColumns(image_col, label_col, src.caption_column, None, names, src.fixed_label)
        return plan_parquet_files(src, view.data_files, cols, part_size, seed, base, id_prefix=src.split)
    if view.builder == "disk":
        ds = _load_disk(src)
        n = ds.num_rows
        if label_col and (has_label_filter(src) or src.class_names or src.sample == "stratified"):
            vals = ds.data.column(label_col).to_pylist()
            labels = [names[v] if names and v is not None and v >= 0 else (None if v is None else str(v)) for v in vals]
            check_label_names(src, {x for x in labels if x is not None})
        else:
            labels = [src.fixed_label] * n if src.fixed_label else [None] * n
        entries = [Entry(i, f"{src.split}/{i}", labels[i]) for i in range(n)]
        args = {"path": src.id, "split": src.split, "image": image_col, "label": label_col, "names": names,
                "caption": src.caption_column, "fixed_label": src.fixed_label}
        return _entry_parts(src, entries, part_size, seed, "hf_disk", args, fingerprint(base, "disk"), where)
    if view.builder == "imagefolder" and all(Path(f.split("?")[0]).suffix.lower() not in (".csv", ".jsonl", ".json")
                                             for f in view.data_files):
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        exts = {e.lower() for e in ImageFolder.EXTENSIONS}
        files = [f for f in view.data_files if Path(f).suffix.lower() in exts]
        if label_col and cl is not None:
            labels = [Path(f).parent.name for f in files]
            check_label_names(src, set(labels))
        else:
            labels = [src.fixed_label] * len(files)
        entries = [Entry(f, f"{src.split}/{_rel_id(f, src.id)}", lab) for f, lab in zip(files, labels)]
        return _entry_parts(src, entries, part_size, seed, "files", {"root": ""}, fingerprint(base, "folder"), where)
    # other formats (webdataset, json, csv, arrow...): one unit per data-file shard, labels filtered as read
    if src.max_samples and src.sample == "stratified":
        raise SourceError(f"source {src.name!r}: sample: stratified needs every row's label before reading, which "
                          f"{src.id} ({view.builder} files) does not give; use sample: first or a parquet copy")
    ds = _load_stream(src).cast_column(image_col, Image(decode=False))
    n_shards = 1 if src.max_samples else max(1, ds.n_shards)
    args = {"image": image_col, "label": label_col, "names": names, "caption": src.caption_column,
            "fixed_label": src.fixed_label, "num_shards": n_shards, "limit": src.max_samples,
            "load": {"path": src.id, "name": src.config, "split": src.split, "revision": src.revision}}
    return [PartSpec(src.name, i, "hf_stream", {**args, "index": i},
                     fingerprint(base, "stream", view.data_files, n_shards, i), 0) for i in range(n_shards)]


def _sample(row: dict, a: dict, oid: str, label: Optional[str]) -> RawSample:
    data, err = image_cell_bytes(row[a["image"]])
    cap = row.get(a["caption"]) if a["caption"] else None
    return RawSample(orig_id=oid, label=label, data=data, caption=None if cap is None else str(cap), error=err)


def _label_of(v: Any, a: dict) -> Optional[str]:
    if a.get("fixed_label") is not None:
        return a["fixed_label"]
    if not a["label"] or v is None:
        return None
    names = a.get("names")
    if names:
        return names[int(v)] if 0 <= int(v) < len(names) else None
    return str(v)


def read_disk(part: PartSpec) -> Iterator[RawSample]:
    """Rows of a ``save_to_disk`` dataset (memory-mapped: only the selected rows are touched)."""
    from datasets import DatasetDict, Image, load_from_disk

    a = part.args
    ds = load_from_disk(a["path"])
    if isinstance(ds, DatasetDict):
        ds = ds[a["split"]]
    ds = ds.cast_column(a["image"], Image(decode=False)).select(a["rows"])
    for i, row in enumerate(ds):
        label = a["labels"][i] if a["labels"][i] is not None else _label_of(row.get(a["label"]) if a["label"] else None, a)
        yield _sample(row, a, a["ids"][i], label)


def read_stream(part: PartSpec) -> Iterator[RawSample]:
    """One data-file shard of a streamed dataset (``IterableDataset.shard``)."""
    from datasets import Image, load_dataset

    a = part.args
    ds = load_dataset(**a["load"], streaming=True).cast_column(a["image"], Image(decode=False))
    if a["num_shards"] > 1:
        ds = ds.shard(num_shards=a["num_shards"], index=a["index"])
    split = a["load"]["split"]
    for j, row in enumerate(ds):
        if a["limit"] and j >= a["limit"]:
            break
        label = _label_of(row.get(a["label"]) if a["label"] else None, a)
        yield _sample(row, a, f"{split}/shard{a['index']}/{j}", label)
