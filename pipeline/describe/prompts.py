"""Per-domain prompt sets (``prompts/<domain>.yaml``) and the requests they expand to per class.

A prompt set holds a system prompt asking for visible traits only, CuPL-style questions, an optional
context note and default sampling settings. Its content hash (sha256 of the file, 16 hex) is stored
as ``prompt_sha`` in every description it produces, so a changed prompt never hides behind a cache.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..recipe import DOMAINS, DescribeConfig
from .template import article, resolve_prompts_dir

PLACEHOLDERS = frozenset({"class", "a_class", "context", "a_context"})


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Strict):
    """Sampling settings of a prompt set. Every one is sent with each request: vLLM otherwise fills the
    unsent ones from the model's generation_config (Qwen2.5: top_k 20, repetition_penalty 1.05)."""

    n: int = Field(10, ge=1)
    temperature: float = Field(0.99, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1: off (every token).")
    min_p: float = Field(0.0, ge=0, le=1, description="0: off.")
    repetition_penalty: float = Field(1.0, gt=0, description="1: off.")
    max_tokens: int = Field(60, ge=1)
    stop: list[str] = Field(default_factory=list)


class Question(_Strict):
    id: str = Field(pattern=r"^[a-z0-9_]{1,48}$")
    text: str
    without_context: Optional[str] = Field(None, description="Used instead of `text` when a class has no context.")

    @field_validator("text", "without_context")
    @classmethod
    def _known_fields(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        unknown = names - PLACEHOLDERS
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)} in {v!r}; allowed: {sorted(PLACEHOLDERS)}")
        return v


class PromptFile(_Strict):
    version: int = 1
    domain: str
    system: str
    context_note: Optional[str] = None
    sampling: Sampling = Field(default_factory=Sampling)
    questions: list[Question] = Field(min_length=1)
    non_visual_terms: list[str] = Field(default_factory=list, description="Added to the default list.")

    @field_validator("questions")
    @classmethod
    def _unique_ids(cls, v: list[Question]) -> list[Question]:
        ids = [q.id for q in v]
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            raise ValueError(f"question ids must be unique, repeated: {dups}")
        return v


@dataclass(frozen=True)
class Prompt:
    """One question asked about one class: chat messages plus the plain prompt for /v1/completions."""

    question_id: str
    messages: tuple[dict[str, str], ...]
    prompt: str


@dataclass
class PromptSet:
    domain: str
    path: Path
    sha: str
    spec: PromptFile
    sampling: dict[str, Any] = field(default_factory=dict)

    def prompts_for(self, class_name: str, context: Optional[str]) -> list[Prompt]:
        """The prompts for one class, in question order (questions needing a missing context skipped)."""
        values = {"class": class_name, "a_class": f"{article(class_name)} {class_name}"}
        if context:
            values |= {"context": context, "a_context": f"{article(context)} {context}"}
        out = []
        for q in self.spec.questions:
            tpl = q.text
            if not context and _uses_context(tpl):
                if q.without_context is None:
                    continue
                tpl = q.without_context
            user = tpl.format(**values)
            if context and self.spec.context_note:
                user = f"{user}\n{self.spec.context_note.format(**values)}"
            messages = ({"role": "system", "content": self.spec.system.strip()}, {"role": "user", "content": user})
            out.append(Prompt(q.id, messages, user))
        return out


def _uses_context(tpl: str) -> bool:
    return any(f in ("context", "a_context") for _, f, _, _ in string.Formatter().parse(tpl))


def resolve_sampling(spec: Sampling, cfg: DescribeConfig) -> dict[str, Any]:
    """Prompt-set sampling with the recipe's non-None overrides applied."""
    return {
        "n": cfg.n_per_question if cfg.n_per_question is not None else spec.n,
        "temperature": cfg.temperature if cfg.temperature is not None else spec.temperature,
        "top_p": cfg.top_p if cfg.top_p is not None else spec.top_p,
        "top_k": cfg.top_k if cfg.top_k is not None else spec.top_k,
        "min_p": cfg.min_p if cfg.min_p is not None else spec.min_p,
        "repetition_penalty": cfg.repetition_penalty if cfg.repetition_penalty is not None else spec.repetition_penalty,
        "max_tokens": cfg.max_tokens if cfg.max_tokens is not None else spec.max_tokens,
        "stop": list(cfg.stop) if cfg.stop is not None else list(spec.stop),
        "seed": cfg.seed,
    }


def load_prompt_set(path: Path, cfg: DescribeConfig) -> PromptSet:
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise PromptError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: a prompt set must be a YAML mapping")
    try:
        spec = PromptFile.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}: invalid prompt set"]
        lines += [f"  - {'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise PromptError("\n".join(lines)) from None
    if spec.domain != path.stem:
        raise PromptError(f"{path}: domain {spec.domain!r} must match the file name ({path.stem!r})")
    sha = hashlib.sha256(raw).hexdigest()[:16]
    return PromptSet(spec.domain, path, sha, spec, resolve_sampling(spec.sampling, cfg))


def load_prompt_sets(cfg: DescribeConfig, domains: Optional[set[str]] = None) -> dict[str, PromptSet]:
    """Load ``<prompts>/<domain>.yaml`` for the given domains (all known domains by default).

    A domain without its own file falls back to ``general.yaml``.
    """
    folder = resolve_prompts_dir(cfg.prompts)
    out: dict[str, PromptSet] = {}
    general = folder / "general.yaml"
    for d in sorted(domains if domains is not None else DOMAINS):
        p = folder / f"{d}.yaml"
        if p.is_file():
            out[d] = load_prompt_set(p, cfg)
        elif general.is_file():
            out[d] = load_prompt_set(general, cfg)
        else:
            raise PromptError(f"no prompt set for domain {d!r}: add {p} (or {general} as the fallback)")
    return out
