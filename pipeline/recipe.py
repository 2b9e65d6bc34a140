"""Recipe: the YAML file that fully describes one dataset build.

One pydantic model per stage, all nested in :class:`Recipe`, all with ``extra="forbid"`` so a
misspelled key is an error naming the key and the file. Cross-field rules live here, not in stages.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Domain = Literal["crops", "livestock", "fishery", "general"]
DOMAINS: tuple[str, ...] = ("crops", "livestock", "fishery", "general")
Role = Literal["train", "eval"]

# Columns the run store owns; a source may not rename its fields onto them.
RESERVED_COLUMNS = frozenset(
    {"uid", "source", "domain", "role", "label", "class_name", "image", "width", "height", "sha256",
     "orig_id", "licence", "caption", "status", "error", "part"}
)
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the offending key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class _SourceBase(_Model):
    name: str = Field(description="Unique source name (lowercase, digits, '_', '-', '.'); used in paths.")
    domain: Domain
    role: Role = Field("train", description="'eval' sources are never written to shards (decontamination, eval).")
    max_samples: Optional[int] = Field(None, ge=1, description="Keep at most this many samples (first N in order).")
    class_names: dict[str, str] = Field(
        default_factory=dict, description="Overrides: raw label -> natural class name."
    )
    context: Optional[str] = Field(
        None, description="Words that give class names their context in prompts, e.g. 'tomato leaf'."
    )
    licence: Optional[str] = None
    citation: Optional[str] = None
    homepage: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _SOURCE_NAME.match(v):
            raise ValueError(
                f"source name {v!r} must match {_SOURCE_NAME.pattern} (it becomes a folder name)"
            )
        return v


class HFSource(_SourceBase):
    kind: Literal["hf"]
    id: str = Field(description="Hugging Face Hub dataset id or a local dataset folder.")
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    streaming: bool = True
    image_column: Optional[str] = Field(None, description="Auto-detected from an Image feature when omitted.")
    label_column: Optional[str] = Field(None, description="Auto-detected (ClassLabel, then a string column).")
    caption_column: Optional[str] = Field(None, description="For general image-text data: keep its captions.")


class ImageFolderSource(_SourceBase):
    kind: Literal["imagefolder"]
    path: str = Field(description="Folder with one sub-folder per class.")


class ParquetSource(_SourceBase):
    kind: Literal["parquet"]
    path: str = Field(description="A parquet file, a folder of them, or a glob.")
    image_column: str = "image"
    label_column: Optional[str] = "label"
    caption_column: Optional[str] = None
    id_column: Optional[str] = None


class WebDatasetSource(_SourceBase):
    kind: Literal["webdataset"]
    path: str = Field(description="Tar shards: a folder, a glob or a brace pattern ('data-{0000..0009}.tar').")
    image_key: str = "jpg;jpeg;png;webp"
    label_key: Optional[str] = Field("cls", description="Extension of the label member, or 'json:FIELD'.")
    caption_key: Optional[str] = Field(None, description="Extension of the caption member (e.g. 'txt').")


class URLSource(_SourceBase):
    kind: Literal["urls"]
    path: str = Field(description="CSV or parquet with a url column and a label (or caption) column.")
    url_column: str = "url"
    label_column: Optional[str] = "label"
    caption_column: Optional[str] = None
    processes: int = Field(2, ge=1)
    threads: int = Field(16, ge=1)
    timeout: int = Field(10, ge=1)
    retries: int = Field(1, ge=0)


class SyntheticSource(_SourceBase):
    kind: Literal["synthetic"]
    classes: list[str] = Field(min_length=1, description="Class names; each gets its own visual pattern.")
    per_class: int = Field(20, ge=1)
    size: int = Field(320, ge=32, le=2048, description="Side of the generated images (before ingest resize).")
    seed: int = 0
    captioned: bool = Field(False, description="Emit a caption per image (a synthetic 'general' pool).")


Source = Annotated[
    Union[HFSource, ImageFolderSource, ParquetSource, WebDatasetSource, URLSource, SyntheticSource],
    Field(discriminator="kind"),
]


class IngestConfig(_Model):
    part_size: int = Field(1000, ge=1, description="Samples per ingest part (the unit of resume).")
    processes: int = Field(2, ge=1)
    jpeg_quality: int = Field(92, ge=50, le=100)
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="Larger images are refused as decompression bombs (Pillow's default)."
    )


class DescribeConfig(_Model):
    backend: Literal["template", "openai", "transformers"] = "template"
    base_url: str = "http://localhost:8000/v1"
    model: Optional[str] = None
    api_key_env: str = Field("VLLM_API_KEY", description="Name of the env var holding the API key.")
    prompts: str = "prompts"
    n_per_question: int = Field(10, ge=1)
    temperature: float = Field(0.99, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(60, ge=1)
    stop: Optional[list[str]] = None
    concurrency: int = Field(64, ge=1)
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)
    use_n: bool = Field(True, description="Ask for n samples in one request where the server supports it.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Passed through (e.g. structured_outputs).")
    non_visual_terms: Optional[list[str]] = Field(None, description="Override the list of non-visual claims to drop.")
    captions_per_image: int = Field(4, ge=1, description="Candidate captions stored per image (best-of-k).")
    device: str = "auto"
    batch_size: int = Field(8, ge=1)


class DedupConfig(_Model):
    exact: bool = True
    near_cosine: Optional[float] = Field(0.96, gt=0, le=1)
    block_size: int = Field(8192, ge=1)


class TopFraction(_Model):
    fraction: float = Field(gt=0, le=1)
    by: Literal["global", "source", "class"] = "global"


class ScoreConfig(_Model):
    enabled: bool = True
    model: str = "openai/clip-vit-base-patch32"
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(64, ge=1)
    best_of_k: bool = True
    min_score: Optional[float] = 0.25
    top: Optional[TopFraction] = None
    min_side: Optional[int] = Field(None, ge=1)
    max_aspect: Optional[float] = Field(None, gt=1)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: bool = True
    decontaminate_cosine: float = Field(0.96, gt=0, le=1)
    write_embeddings: bool = True


class MixConfig(_Model):
    enabled: bool = True
    shares: Optional[dict[str, float]] = Field(None, description="Target share per bucket; must sum to 1.")
    bucket_by: Literal["domain", "source"] = "domain"
    total: Optional[int] = Field(None, ge=1, description="Rows in the mix; None = as large as caps allow.")
    class_temperature: float = Field(1.0, gt=0)
    class_cap: Optional[int] = Field(None, ge=1)
    max_repeats: int = Field(1, ge=1)

    @field_validator("shares")
    @classmethod
    def _shares_sum(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if v is None:
            return v
        bad = {k: s for k, s in v.items() if not (0 <= s <= 1)}
        if bad:
            raise ValueError(f"every share must be within [0, 1], got {bad}")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"shares must sum to 1, they sum to {total:.6g}: {v}")
        return v


class WriteConfig(_Model):
    samples_per_shard: int = Field(10000, ge=1)
    formats: list[Literal["webdataset", "hf"]] = Field(default_factory=lambda: ["webdataset", "hf"])


class TrainConfig(_Model):
    enabled: bool = False
    model: str = "openai/clip-vit-base-patch32"
    from_config: Optional[dict[str, Any]] = Field(
        None, description="Build a randomly initialised CLIP from this config instead of loading weights."
    )
    epochs: float = Field(1, gt=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_accum: int = Field(1, ge=1)
    freeze: Optional[Literal["vision", "text"]] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    save_every: int = Field(500, ge=1)
    seed: int = 0


class EvalConfig(_Model):
    enabled: bool = False
    classifiers: list[Literal["template", "descriptions", "both"]] = Field(
        default_factory=lambda: ["template", "descriptions", "both"]
    )
    batch_size: int = Field(64, ge=1)


class UploadConfig(_Model):
    enabled: bool = False
    repo_id: Optional[str] = None
    private: bool = True
    include_webdataset: bool = False


class RunnerConfig(_Model):
    kind: Literal["local", "ray"] = "local"
    address: Optional[str] = None
    workers: int = Field(2, ge=1)


class Recipe(_Model):
    name: str
    seed: int = 0
    image_size: int = Field(256, ge=16, le=4096)
    sources: list[Source] = Field(min_length=1)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    upload: UploadConfig = Field(default_factory=UploadConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        names = [s.name for s in self.sources]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"source names must be unique, repeated: {dups}")
        if not any(s.role == "train" for s in self.sources):
            raise ValueError("at least one source must have role: train")
        for s in self.sources:
            for col in ("image_column", "label_column", "caption_column", "id_column"):
                val = getattr(s, col, None)
                if val is not None and s.kind == "parquet" and val in {"uid", "source", "domain"}:
                    raise ValueError(f"source {s.name}: {col}={val!r} clashes with a reserved run-store column")
        if self.mix.enabled and self.mix.shares:
            buckets = (
                {s.domain for s in self.sources if s.role == "train"}
                if self.mix.bucket_by == "domain"
                else {s.name for s in self.sources if s.role == "train"}
            )
            unknown = sorted(set(self.mix.shares) - buckets)
            if unknown:
                raise ValueError(
                    f"mix.shares names buckets with no train source: {unknown} (buckets here: {sorted(buckets)})"
                )
        return self

    # ----- helpers used by stages -----
    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def fingerprint(self, *parts: Any) -> str:
        """Stable hash of the given recipe fragments (pydantic models or plain JSON values)."""
        return fingerprint(*parts)

    @property
    def sha(self) -> str:
        return fingerprint(self)


def _jsonable(x: Any) -> Any:
    if isinstance(x, BaseModel):
        return x.model_dump(mode="json")
    return x


def fingerprint(*parts: Any) -> str:
    """sha256 (hex, 16 chars) of a canonical JSON dump of ``parts``."""
    blob = json.dumps([_jsonable(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        if k.isdigit() and isinstance(cur, list):
            cur = cur[int(k)]
        else:
            cur = cur.setdefault(k, {})
    last = keys[-1]
    if last.isdigit() and isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def _format_errors(err: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid recipe ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelled? see schemas/recipe.schema.json for the allowed keys)"
        lines.append(f"  - {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_recipe(data: Any, where: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, where)) from None


def load_recipe(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """Read and validate a recipe file; ``overrides`` maps dotted keys ('score.min_score') to values.

    Relative paths inside sources are resolved against the recipe file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict):
        for k, v in (overrides or {}).items():
            _set_path(data, k, v)
        base = path.resolve().parent
        for s in data.get("sources") or []:
            if isinstance(s, dict) and isinstance(s.get("path"), str) and "://" not in s["path"]:
                p = Path(s["path"]).expanduser()
                s["path"] = str(p if p.is_absolute() else (base / p))
        d = data.get("describe")
        if isinstance(d, dict) and isinstance(d.get("prompts"), str):
            p = Path(d["prompts"])
            if not p.is_absolute() and not (Path.cwd() / p).exists() and (base / p).exists():
                d["prompts"] = str(base / p)
    return parse_recipe(data, where=str(path))


def recipe_json_schema() -> dict:
    return Recipe.model_json_schema()
