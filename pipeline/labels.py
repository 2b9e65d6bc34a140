"""Raw dataset labels -> natural class names ("Tomato___Late_blight" -> "tomato late blight")."""

from __future__ import annotations

import re
import unicodedata
from typing import Mapping, Optional

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_SEPARATORS = re.compile(r"[_\-/\\|.,;:]+")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PAREN = re.compile(r"\(\s+")
_SPACE_AFTER_PAREN = re.compile(r"\s+\)")
_PUNCT_EDGES = "()[]{} '\"`"


def clean_class_name(raw: str, overrides: Optional[Mapping[str, str]] = None) -> str:
    """Turn a dataset label into a natural, lowercase class name.

    Rules: per-source override first; then Unicode NFKC, camelCase split, separators ('_', '-', '/',
    '.') to spaces, lowercase, collapse spaces, tidy parentheses, drop stray edge punctuation.
    Parentheses are kept ("corn (maize) common rust"). An empty result falls back to the raw label.

    Args:
        raw: the label as the dataset stores it.
        overrides: raw label -> class name, from the recipe.
    """
    if overrides and raw in overrides:
        return overrides[raw]
    s = unicodedata.normalize("NFKC", str(raw))
    s = "".join(ch for ch in s if unicodedata.category(ch)[0] != "C")  # control chars
    s = _CAMEL.sub(" ", s)
    s = _SEPARATORS.sub(" ", s)
    s = s.lower()
    s = _SPACES.sub(" ", s)
    s = _SPACE_BEFORE_PAREN.sub("(", s)
    s = _SPACE_AFTER_PAREN.sub(")", s)
    s = s.strip(_PUNCT_EDGES).strip()
    if s.count("(") > s.count(")"):
        s += ")"
    # "pepper, bell" style and repeated words from "Tomato___Tomato_mosaic_virus"
    words = s.split(" ")
    dedup = [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]
    s = " ".join(dedup)
    return s or str(raw).strip() or "unknown"
