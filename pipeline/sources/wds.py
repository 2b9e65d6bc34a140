"""WebDataset tar shards (local): one part per tar, or per slice of a counted tar, read inside the units.

A brace pattern need not exist in full: the shards present are used (``alive sources inspect`` says
how many are missing). With ``max_samples`` only the first shards are opened, as many as it needs:
their samples are counted from the tar headers (no image bytes are read).
"""

from __future__ import annotations

import glob as globlib
import json
import tarfile
from pathlib import Path
from typing import Iterator, Optional

from ..recipe import WebDatasetSource, fingerprint
from .base import PartSpec, RawSample, SourceError


def _tar_urls(path: str) -> list[str]:
    import braceexpand

    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.glob("*.tar"))
    out: list[str] = []
    for pat in braceexpand.braceexpand(path):
        out += sorted(globlib.glob(pat)) if any(c in pat for c in "*?[") else [pat]
    return out


def _decode_text(v: bytes, what: str) -> tuple[Optional[str], Optional[str]]:
    try:
        return v.decode("utf-8").strip(), None
    except UnicodeDecodeError:
        return None, f"{what} is not valid UTF-8 ({v[:40]!r}); re-encode the source's labels as UTF-8"


def iter_tar_samples(
    urls: list[str], image_key: str, label_key: Optional[str], caption_key: Optional[str], limit: Optional[int]
) -> Iterator[RawSample]:
    import webdataset as wds

    exts = image_key.split(";")
    n = 0
    for url in urls:
        name = Path(url).name
        try:
            for s in wds.WebDataset(url, shardshuffle=False, empty_check=False):
                if limit and n >= limit:
                    return
                n += 1
                oid = f"{name}/{s['__key__']}"
                img = next((s[e] for e in exts if e in s), None)
                err = None if img is not None else f"no image member ({image_key}) for key {s['__key__']}"
                label = caption = None
                if label_key:
                    if label_key.startswith("json:"):
                        field = label_key[5:]
                        try:
                            meta = json.loads(s.get("json", b"{}"))
                            label = None if meta.get(field) is None else str(meta.get(field))
                        except (ValueError, UnicodeDecodeError) as e:
                            err = err or f"bad json member: {e}"
                    elif label_key in s:
                        label, e2 = _decode_text(s[label_key], "label")
                        err = err or e2
                if caption_key and caption_key in s:
                    caption, e3 = _decode_text(s[caption_key], "caption")
                    err = err or e3
                yield RawSample(orig_id=oid, label=label, data=img, caption=caption, error=err)
        except Exception as e:  # a corrupt tar: record it and go on with the next one
            yield RawSample(orig_id=f"{name}/<tar>", label=None, error=f"cannot read tar {url}: {e}")


def count_samples(url: str) -> int:
    """Samples in a tar: distinct keys (webdataset's rule: the name up to the first dot), from the headers."""
    keys: set[str] = set()
    with tarfile.open(url, "r:") as tf:  # uncompressed: member data is skipped by seeking
        for m in tf:
            if m.isfile():
                base = Path(m.name)
                keys.add(str(base.parent / base.name.split(".", 1)[0]))
    return len(keys)


def present_shards(src: WebDatasetSource) -> tuple[list[str], list[str]]:
    urls = _tar_urls(src.path)
    present = [u for u in urls if Path(u).exists()]
    return present, [u for u in urls if not Path(u).exists()]


def plan(src: WebDatasetSource, part_size: int, spool_dir: Path, seed: int = 0) -> list[PartSpec]:
    present, missing = present_shards(src)
    if not present:
        raise SourceError(f"source {src.name!r}: no tar shards at {src.path} (missing: {missing[:3]}); fix 'path'")
    if src.max_samples and src.sample == "stratified":
        raise SourceError(f"source {src.name!r}: sample: stratified needs every sample's label before reading, which "
                          "tar shards do not give; use sample: first")
    base = fingerprint(src, "wds-v2")
    parts: list[PartSpec] = []
    args = {"image_key": src.image_key, "label_key": src.label_key, "caption_key": src.caption_key}

    def add(url: str, start: Optional[int], stop: Optional[int]) -> None:
        st = Path(url).stat()
        parts.append(PartSpec(src.name, len(parts), "wds_tar", {**args, "url": url, "start": start, "stop": stop},
                              fingerprint(base, url, st.st_size, st.st_mtime_ns, start, stop),
                              (stop - start) if stop is not None else 0))

    if not src.max_samples:
        for url in present:
            add(url, None, None)
        return parts
    left = src.max_samples
    for url in present:
        try:
            n = min(count_samples(url), left)
        except (tarfile.TarError, OSError):
            n = 1  # an unreadable tar: its part records the error as one failed sample

        for start in range(0, n, part_size):
            add(url, start, min(n, start + part_size))
        left -= n
        if left <= 0:
            break
    if not parts:
        raise SourceError(f"source {src.name!r}: the tar shards at {src.path} hold no samples")
    return parts


def read_tar(part: PartSpec) -> Iterator[RawSample]:
    a = part.args
    start, stop = a["start"], a["stop"]
    for i, s in enumerate(iter_tar_samples([a["url"]], a["image_key"], a["label_key"], a["caption_key"], stop)):
        if start is None or i >= start:
            yield s
