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
    max_samples: Optional[int] = Field(
        None, ge=1, description="Keep at most this many samples (after the label filters), chosen as 'sample' says."
    )
    sample: Literal["first", "stratified"] = Field(
        "first", description="How max_samples picks rows: the first N in source order, or per class in proportion "
        "to its count (rows chosen by a hash of the seed and the row id), so class-sorted sources keep every class.",
    )
    include_labels: Optional[list[str]] = Field(
        None, description="Keep only rows with these raw labels (checked against the labels the source has)."
    )
    exclude_labels: list[str] = Field(
        default_factory=list, description="Drop rows with these raw labels (recorded in excluded/ingest/ with a reason)."
    )
    class_names: dict[str, str] = Field(
        default_factory=dict, description="Raw label -> natural class name (checked against the source's labels)."
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

    @model_validator(mode="after")
    def _labels_ok(self) -> "_SourceBase":
        if self.include_labels is not None and not self.include_labels:
            raise ValueError(f"source {self.name}: include_labels is empty (leave it out to keep every label)")
        both = sorted(set(self.include_labels or ()) & set(self.exclude_labels))
        if both:
            raise ValueError(f"source {self.name}: labels both included and excluded: {both}")
        dropped = sorted(set(self.class_names) & set(self.exclude_labels))
        if dropped:
            raise ValueError(f"source {self.name}: class_names renames excluded labels {dropped}; drop one of the two")
        return self


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
    fixed_label: Optional[str] = Field(
        None, description="Every row gets this raw label: for image-only datasets of a single class "
        "(the dataset's own label column, if any, is then ignored).",
    )


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
    """Describe stage: which generator writes the class descriptions and how it is asked.

    Sampling fields left as None take the prompt set's values (``prompts/<domain>.yaml``).
    """

    backend: Literal["template", "openai", "transformers"] = "template"
    base_url: str = Field("http://localhost:8000/v1", description="OpenAI-compatible server (vllm serve).")
    model: Optional[str] = Field(None, description="Served model name (openai) or hub id / local folder (transformers).")
    api: Literal["chat", "completions"] = Field("chat", description="/v1/chat/completions or /v1/completions.")
    api_key_env: str = Field("VLLM_API_KEY", description="Name of the env var holding the API key.")
    prompts: str = "prompts"
    n_per_question: Optional[int] = Field(None, ge=1, description="Samples per question (None: prompt set's n).")
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="-1 = off (None: prompt set's value, -1 by default).")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="0 = off (None: prompt set's value, 0 by default).")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="1 = off (None: prompt set's value, 1 by default).")
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Optional[list[str]] = None
    seed: Optional[int] = Field(0, description="Base of the per-request sampling seed (None: no seed). The transformers "
                                "backend always uses it; the openai backend sends it only with send_seed.")
    send_seed: bool = Field(
        False, description="Send a seed with every openai request. vLLM then samples those requests row by row (a "
        "generator per request) instead of as one batch, which costs throughput; reruns reproduce from the request "
        "cache without it.")
    concurrency: int = Field(64, ge=1, description="Requests in flight at most.")
    timeout: float = Field(60.0, gt=0, description="Seconds per request attempt.")
    max_retries: int = Field(6, ge=0, description="Retries per request on timeouts, 429, 5xx and broken replies.")
    backoff_base: float = Field(0.5, ge=0, description="First retry waits up to this many seconds (doubling).")
    backoff_max: float = Field(30.0, ge=0, description="Longest wait between retries (Retry-After may ask more).")
    use_n: bool = Field(True, description="Ask for n samples in one request where the server supports it.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Passed through (e.g. structured_outputs).")
    cache: bool = Field(True, description="Persistent request cache at <run>/describe/cache.sqlite.")
    non_visual_terms: Optional[list[str]] = Field(None, description="Override the list of non-visual claims to drop.")
    require_class_mention: bool = Field(True, description="Drop sentences naming neither the class nor its head noun.")
    clip_tokenizer: Optional[str] = Field(
        "openai/clip-vit-base-patch32",
        description="Tokenizer (local folder or cached hub id) that bounds texts to max_text_tokens; a "
        "conservative word/char estimate is used when it cannot be loaded offline.",
    )
    max_text_tokens: int = Field(77, ge=8, description="CLIP's context length, start and end tokens included.")
    captions_per_image: int = Field(4, ge=1, description="Candidate captions stored per image (best-of-k).")
    device: str = "auto"
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call (transformers backend).")


class DedupConfig(_Model):
    exact: bool = Field(True, description="Drop byte-identical images (sha256) across all train sources.")
    near_cosine: Optional[float] = Field(
        0.96, gt=0, le=1, description="Drop images whose embedding cosine to a better-scoring kept image is >= this."
    )
    block_size: int = Field(8192, ge=1, description="Rows per block of the similarity products (memory ~ block^2).")


class TopFraction(_Model):
    fraction: float = Field(gt=0, le=1, description="Keep the best ceil(fraction * n) pairs by CLIP score.")
    by: Literal["global", "source", "class"] = "global"


class ScoreConfig(_Model):
    enabled: bool = True
    model: str = Field("openai/clip-vit-base-patch32", description="CLIP or SigLIP: hub id or local folder.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16, else fp32."
    )
    batch_size: int = Field(64, ge=1)
    compile: bool = Field(False, description="torch.compile the image tower: tens of seconds once per process, "
                          "then faster (about 1.5x on a bf16 CPU); pays from a few thousand images.")
    best_of_k: bool = Field(True, description="Keep the best-scoring of an image's caption candidates.")
    min_score: Optional[float] = 0.25
    top: Optional[TopFraction] = None
    min_side: Optional[int] = Field(None, ge=1, description="Drop images whose original shorter side is smaller.")
    max_aspect: Optional[float] = Field(None, gt=1, description="Drop images whose long/short side ratio is larger.")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: bool = Field(True, description="Drop train images that (near-)duplicate an eval-source image.")
    decontaminate_cosine: float = Field(0.96, gt=0, le=1)


class MixConfig(_Model):
    """Mix stage: how many rows of each bucket (domain, or domain/source) go to the shards.

    Targets come from exactly one of: ``shares`` (per bucket), ``general_share`` (general vs domain
    data, the domain side split by ``domain_split``), or neither (every bucket in proportion to its
    pool). Within a bucket, classes are balanced by temperature (p ∝ n^(1/T)) under a per-class cap;
    samples may repeat up to ``max_repeats`` times. Targets the pool cannot meet are reported in
    ``mix/mix_report.json`` and handled as ``on_infeasible`` says.
    """

    enabled: bool = True
    shares: Optional[dict[str, float]] = Field(
        None, description="Target share per bucket (domain, or source name with bucket_by: source); sums to 1."
    )
    general_share: Optional[float] = Field(
        None, ge=0, le=1,
        description="Instead of shares: share of the general bucket(s); the rest goes to the domain buckets.",
    )
    domain_split: Literal["proportional", "equal", "temperature"] = Field(
        "proportional",
        description="How general_share's two sides are split over their buckets: in proportion to the "
        "pool (after class caps), equally, or by temperature (pool^(1/split_temperature)).",
    )
    bucket_by: Literal["domain", "source"] = "domain"
    source_split: Optional[Literal["proportional", "equal", "temperature"]] = Field(
        None, description="Sub-bucket each domain by source ('domain/source' buckets), splitting its share this way."
    )
    split_temperature: float = Field(2.0, gt=0, description="Temperature of 'temperature' splits.")
    total: Optional[int] = Field(
        None, ge=1,
        description="Rows in the mix (repeats counted). None = as large as the caps allow: the bucket with the "
        "most data for its share is used once, no bucket beyond class_cap x max_repeats.",
    )
    on_infeasible: Literal["shrink", "keep_total", "error"] = Field(
        "shrink",
        description="When a bucket cannot supply its share of total: 'shrink' the total to the largest size "
        "that meets every share exactly, 'keep_total' and fill the missing rows from the other buckets "
        "(shares then differ from target), or 'error'. Every case is recorded in mix_report.json.",
    )
    class_temperature: float = Field(1.0, gt=0, description="Class balancing in a bucket: p ∝ n^(1/T); 1 = natural.")
    class_cap: Optional[int] = Field(
        None, ge=1, description="At most this many rows per class (repeats counted), MetaCLIP-style."
    )
    max_repeats: int = Field(1, ge=1, description="Upsampling limit: copies of one sample in the mix.")

    @field_validator("shares")
    @classmethod
    def _shares_sum(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if v is None:
            return v
        if not v:
            raise ValueError("shares is empty: name at least one bucket, or leave shares out")
        bad = {k: s for k, s in v.items() if not (0 <= s <= 1)}
        if bad:
            raise ValueError(f"every share must be within [0, 1], got {bad}")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"shares must sum to 1, they sum to {total:.6g}: {v}")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> "MixConfig":
        if self.shares is not None and self.general_share is not None:
            raise ValueError("set either mix.shares or mix.general_share, not both")
        if self.source_split is not None and self.bucket_by != "domain":
            raise ValueError("mix.source_split sub-buckets domains by source: it needs bucket_by: domain")
        return self


class WriteConfig(_Model):
    samples_per_shard: int = Field(10000, ge=1)
    formats: list[Literal["webdataset", "hf"]] = Field(default_factory=lambda: ["webdataset", "hf"])


class DalipConfig(_Model):
    """DALIP's distribution alignment (Wu et al. 2025, github XavierHeart/DALIP), used when ``loss: dalip``.

    The loss is ``clip_weight * InfoNCE(pooled) + mean_weight * InfoNCE(token means) +
    mbdc_weight * InfoNCE(MBDC)``, all with CLIP's temperature. The repository's code weighs the pooled
    term by alpha = 0.5 and the MBDC term by 1 - alpha; the token-mean term is the paper's first-order
    statistic (``mean_weight: 0`` gives the repository's loss exactly).
    """

    clip_weight: float = Field(0.5, ge=0, description="Weight of the usual pooled-embedding contrastive loss.")
    mean_weight: float = Field(0.5, ge=0, description="Weight of the contrastive loss over projected token means.")
    mbdc_weight: float = Field(0.5, ge=0, description="Weight of the contrastive loss over MBDC embeddings.")
    heads: int = Field(4, ge=1, description="MBDC heads: the embedding's channels are split into this many groups.")
    mbdc_dim: Optional[int] = Field(
        46, ge=2, description="Channels per head after the reduction layer (DALIP: 128 -> 46); None = no reduction."
    )
    dropout: float = Field(0.5, ge=0, lt=1, description="Channel dropout before the BDC matrix (DALIP: 0.5).")
    eps: float = Field(1e-5, gt=0, description="Added under the square root of the BDC distances (DALIP: 1e-5).")

    @model_validator(mode="after")
    def _some_weight(self) -> "DalipConfig":
        if self.clip_weight + self.mean_weight + self.mbdc_weight <= 0:
            raise ValueError("train.dalip: clip_weight, mean_weight and mbdc_weight are all 0; nothing to train")
        return self


class DinoConfig(_Model):
    """DINO self-distillation on the image tower (Caron et al. 2021, facebookresearch/dino ``main_dino.py``
    defaults) plus AgriCLIP's alignment of the self-supervised features with the contrastive embedding
    (Nawaz et al. 2025, github umair1221/AgriCLIP), used when ``ssl: dino``.
    """

    weight: float = Field(1.0, gt=0, description="Weight of the DINO loss next to the contrastive loss.")
    align_weight: float = Field(
        1.0, ge=0, description="Weight of the alignment term: a linear map of the student's crop feature must "
                               "match the (fixed) CLIP image embedding of the same image."
    )
    out_dim: int = Field(65536, ge=2, description="Prototypes of the DINO head (DINO: 65536).")
    hidden_dim: int = Field(2048, ge=1, description="Hidden width of the head's 3-layer MLP.")
    bottleneck_dim: int = Field(256, ge=1, description="Bottleneck before the weight-normalised last layer.")
    local_crops: int = Field(8, ge=0, description="Small crops per image next to the 2 global crops (DINO: 8).")
    global_scale: tuple[float, float] = Field((0.4, 1.0), description="Area range of the global crops.")
    local_scale: tuple[float, float] = Field((0.05, 0.4), description="Area range of the local crops.")
    local_size: Optional[int] = Field(
        None, ge=1, description="Side of the local crops; None = 96/224 of the model's input side (DINO's ratio)."
    )
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature after the warmup (sharpening).")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at step 0.")
    teacher_temp_warmup_steps: int = Field(0, ge=0, description="Linear warmup of the teacher temperature.")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA of the teacher-output centre.")
    momentum_teacher: float = Field(
        0.996, ge=0, le=1, description="EMA momentum of the teacher at step 0; cosine-increased to 1 at the end."
    )
    freeze_last_layer_steps: Optional[int] = Field(
        None, ge=0, description="Keep the head's last layer fixed for this many steps (DINO: the first epoch); "
                                "None = one epoch of optimizer steps."
    )

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"a crop scale is (low, high) with 0 < low <= high <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _head_ok(self) -> "DinoConfig":
        if self.bottleneck_dim > self.hidden_dim:
            raise ValueError(f"train.dino.bottleneck_dim {self.bottleneck_dim} exceeds hidden_dim {self.hidden_dim}")
        return self


class TrainConfig(_Model):
    """Contrastive fine-tune of a CLIP on the run's webdataset shards.

    Defaults follow AgriCLIP's ViT-B/32 recipe (open_clip: AdamW betas 0.9/0.98, eps 1e-6, weight decay
    0.2, batch 128, lr 1e-3, warmup then cosine), scaled to the recipe: the lr scales linearly with the
    effective batch (``batch_size * grad_accum``) relative to 128, and warmup is a share of the steps.
    """

    enabled: bool = False
    model: str = Field("openai/clip-vit-base-patch32",
                       description="Hub id or local folder of a transformers CLIP (weights, tokenizer, processor).")
    from_config: Optional[dict[str, Any]] = Field(
        None, description="Build a randomly initialised CLIP from this CLIPConfig instead of loading weights "
                          "(the tokenizer and image processor still come from `model`)."
    )
    epochs: float = Field(1, gt=0, description="Passes over the shards (sizes.json counts); fractions allowed.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (caps epochs).")
    batch_size: int = Field(128, ge=2, description="Contrastive batch per micro-step (the negatives of a step).")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; the loss is computed over all of them "
                             "(open_clip's feature cache), so accumulation also adds negatives."
    )
    lr: Optional[float] = Field(None, gt=0, description="Peak lr; None = 1e-3 * batch_size * grad_accum / 128.")
    weight_decay: float = Field(0.2, ge=0, description="Not applied to biases, norms, embeddings, logit_scale.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: Optional[int] = Field(None, ge=0, description="None = 5% of the optimizer steps (at least 1).")
    grad_clip: Optional[float] = Field(None, gt=0, description="Clip the gradient norm to this value.")
    freeze: Optional[Literal["vision", "text"]] = Field(
        None, description="Lock one tower (LiT: 'vision' keeps the image tower fixed and tunes the text tower)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on a GPU that has it (fp16 + loss scaling otherwise), fp32 on CPU."
    )
    device: str = "auto"
    augment: bool = Field(True, description="Random resized crop (area 0.9-1.0) as open_clip's train transform.")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples in the seeded shuffle buffer.")
    workers: int = Field(4, ge=1, description="Image decode threads.")
    log_every: int = Field(10, ge=1, description="Optimizer steps per metrics.jsonl line.")
    save_every: int = Field(500, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    loss: Literal["clip", "dalip"] = Field(
        "clip", description="clip = InfoNCE over the pooled embeddings; dalip = DALIP's distribution alignment "
                            "(token means + MBDC, settings in train.dalip)."
    )
    dalip: DalipConfig = Field(default_factory=DalipConfig)
    ssl: Literal["none", "dino"] = Field(
        "none", description="dino = AgriCLIP's self-supervised branch on the image tower (settings in train.dino)."
    )
    dino: DinoConfig = Field(default_factory=DinoConfig)

    @model_validator(mode="after")
    def _ssl_needs_vision(self) -> "TrainConfig":
        if self.ssl == "dino" and self.freeze == "vision":
            raise ValueError("train.ssl: dino trains the image tower, which train.freeze: vision locks; drop one")
        return self


class EvalConfig(_Model):
    """Zero-shot classification of every ``role: eval`` source, base model vs fine-tuned model."""

    enabled: bool = False
    classifiers: list[Literal["template", "descriptions", "both"]] = Field(
        default_factory=lambda: ["template", "descriptions", "both"],
        description="template = prompts/templates.yaml; descriptions = the describe stage's class sentences "
                    "(CuPL: mean of normalised text embeddings); both = the two sets together.",
    )
    base_model: Optional[str] = Field(
        None, description="Model to compare against; None = train.model (or the random init of train.from_config)."
    )
    models: Optional[dict[str, str]] = Field(
        None, description="Name -> hub id or folder of the models to evaluate; None = base and fine-tuned.")
    batch_size: int = Field(64, ge=1)
    max_per_task: Optional[int] = Field(None, ge=1, description="Evaluate at most this many images per source.")
    device: str = "auto"

    @field_validator("classifiers")
    @classmethod
    def _classifiers_ok(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("eval.classifiers needs at least one of template, descriptions, both")
        if len(set(v)) != len(v):
            raise ValueError(f"eval.classifiers has repeats: {v}")
        return v


class UploadConfig(_Model):
    """Optional last step of a build: upload the Hugging Face layout to a Hub dataset repo (token: HF_TOKEN)."""

    enabled: bool = False
    repo_id: Optional[str] = Field(None, description="Dataset repo ORG/NAME (created if missing).")
    private: bool = Field(True, description="Visibility of the repo when it is created.")
    include_webdataset: bool = Field(False, description="Also upload the tar shards under webdataset/.")

    @model_validator(mode="after")
    def _repo_needed(self) -> "UploadConfig":
        if self.enabled and not (self.repo_id and re.match(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$", self.repo_id)):
            raise ValueError(f"upload.enabled needs upload.repo_id as ORG/NAME, got {self.repo_id!r}")
        return self


class RunnerConfig(_Model):
    """Where the shard tasks run; never changes what is written (left out of the recipe hash)."""

    kind: Literal["local", "ray"] = Field("local", description="local threads/processes, or prefect-ray's RayTaskRunner.")
    address: Optional[str] = Field(None, description="Ray cluster ('ray://head:10001', 'auto'); None starts a local instance.")
    workers: int = Field(2, ge=1, description="Task threads (local) or CPUs of a local Ray instance.")


# Recipe blocks that change how a build runs, never what it writes (left out of Recipe.sha).
EXECUTION_ONLY = frozenset({"runner", "upload"})


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
        """Hash of everything that shapes the data; where it runs (runner) and where it goes (upload) do not."""
        return fingerprint(self.model_dump(mode="json", exclude=EXECUTION_ONLY))


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
