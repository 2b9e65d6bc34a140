"""The class a description is for: (domain, class name, source context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, order=True)
class ClassInfo:
    domain: str
    class_name: str
    context: Optional[str] = None
