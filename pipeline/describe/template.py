"""The hand-written template baseline (CLIP's standard prompts): no LLM involved."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import yaml

from ..recipe import DescribeConfig
from ..stats import StageStats
from ..store import RunStore
from ..tables import DESCRIPTIONS

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (by sound for the common exceptions)."""
    w = word.strip().lower()
    if not w:
        return "a"
    an_exceptions = ("hour", "honest", "honour", "heir", "herb")
    a_exceptions = ("uni", "use", "usu", "eu", "one", "once", "ewe", "ur", "uter")
    if w.startswith(an_exceptions):
        return "an"
    if w.startswith(a_exceptions):
        return "a"
    if len(w) > 1 and w.isupper() and w[0] in "FHLMNRSX":  # acronyms said letter by letter
        return "an"
    return "an" if w[0] in "aeiou" else "a"


def resolve_prompts_dir(path: str) -> Path:
    """The prompts folder a recipe names: a path (absolute or from the working directory), else the shipped
    ``prompts/`` when the recipe keeps the default name."""
    from ..assets import asset_dir

    p = Path(path)
    if p.is_dir():
        return p
    if path.rstrip("/") == "prompts":
        return asset_dir("prompts")
    if (PROJECT_ROOT / p).is_dir():
        return PROJECT_ROOT / p
    raise FileNotFoundError(f"prompts folder {path!r} not found (looked in . and {PROJECT_ROOT}); fix describe.prompts")


class TemplateBackend:
    name = "template"

    def __init__(self, cfg: DescribeConfig, store: RunStore):
        self.cfg = cfg
        path = resolve_prompts_dir(cfg.prompts) / "templates.yaml"
        self.raw = path.read_bytes()
        self.templates: dict[str, list[str]] = yaml.safe_load(self.raw)["templates"]
        self.sha = hashlib.sha256(self.raw).hexdigest()[:16]

    def version(self) -> str:
        return f"template:{self.sha}"

    def describe(self, classes, stats: StageStats) -> pa.Table:
        rows = []
        for c in classes:
            for qi, tpl in enumerate(self.templates.get(c.domain) or self.templates["general"]):
                text = tpl.format(**{"class": c.class_name, "a_class": f"{article(c.class_name)} {c.class_name}"})
                rows.append({
                    "domain": c.domain, "class_name": c.class_name, "question_id": f"t{qi:02d}", "sample_index": 0,
                    "text": text, "backend": "template", "model": None, "prompt_sha": self.sha,
                    "sampling": json.dumps({}), "kept": True, "reject_reason": None,
                })
        stats.add("classes", len(classes))
        return pa.Table.from_pylist(rows, schema=DESCRIPTIONS)
