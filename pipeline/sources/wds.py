"""WebDataset tar shards (local), spooled into parts."""

from __future__ import annotations

import glob as globlib
import json
from pathlib import Path
from typing import Iterator, Optional

from ..recipe import WebDatasetSource, fingerprint
from .base import PartSpec, RawSample, SourceError, spool


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


def plan(src: WebDatasetSource, part_size: int, spool_dir: Path) -> list[PartSpec]:
    urls = _tar_urls(src.path)
    missing = [u for u in urls if not Path(u).exists()]
    if not urls or missing:
        raise SourceError(f"source {src.name!r}: no tar shards at {src.path} (missing: {missing[:3]}); fix 'path'")
    samples = iter_tar_samples(urls, src.image_key, src.label_key, src.caption_key, src.max_samples)
    parts = spool(samples, src.name, part_size, spool_dir / src.name, fingerprint(src, "wds-v1"))
    if not parts:
        raise SourceError(f"source {src.name!r}: the tar shards at {src.path} hold no samples")
    return parts
