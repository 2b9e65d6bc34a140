"""Arrow schemas of every table the run store writes.

``schemas/tables/*.json`` holds the same schemas as JSON (a test fails when they drift). Stages build
their output with these schemas so a column can never silently change type between runs.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

# ingest/<source>/part-NNNNN.parquet: one row per input sample, failed ones included (status/error).
INGEST = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("class_name", pa.string()),
        pa.field("orig_id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("caption", pa.string()),  # original caption (general image-text data), else null
        pa.field("licence", pa.string()),
        pa.field("synthetic", pa.bool_(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # success | failed_to_decode | ...
        pa.field("error", pa.string()),
    ]
)

# describe/descriptions.parquet: class-level sentences with provenance and keep/reject decisions.
DESCRIPTIONS = pa.schema(
    [
        pa.field("domain", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("backend", pa.string(), nullable=False),  # template | openai | transformers
        pa.field("model", pa.string()),
        pa.field("prompt_sha", pa.string(), nullable=False),
        pa.field("sampling", pa.string()),  # JSON of the sampling params
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string()),
    ]
)

# pair/<source>/part-NNNNN.parquet: caption candidates per successfully ingested image.
PAIRS = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("candidates", pa.list_(pa.string()), nullable=False),
        pa.field("caption_source", pa.string(), nullable=False),  # template | llm | original
    ]
)

# score/<source>/part-NNNNN.parquet: the chosen caption per image and every filter decision.
SCORES = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_source", pa.string(), nullable=False),
        pa.field("clip_score", pa.float32()),
        pa.field("score_model", pa.string()),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("drop_reason", pa.string()),
    ]
)

# mix/manifest.parquet: which samples go to the shards and how often.
MANIFEST = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("repeats", pa.int32(), nullable=False),
        pa.field("bucket", pa.string(), nullable=False),
    ]
)

# shards/wds/NNNNN.parquet (img2dataset's sidecar: its columns url, caption, key, status, error_message, width,
# height, original_width, original_height, exif, sha256, plus ours) and the rows of shards/hf/data/*.parquet.
SHARD_META = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),  # the download URL for URL-list sources, else null (local files, datasets)
        pa.field("uid", pa.string(), nullable=False),
        pa.field("repeat", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_source", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("class_name", pa.string()),
        pa.field("clip_score", pa.float32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("orig_id", pa.string()),
        pa.field("licence", pa.string()),
        pa.field("synthetic", pa.bool_()),
        pa.field("exif", pa.string()),  # always null: images are re-encoded without EXIF
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
    ]
)

# score/embeddings/metadata/metadata_N.parquet: clip-retrieval's metadata layout, rows aligned with the .npy files.
EMBEDDING_METADATA = pa.schema(
    [
        pa.field("image_path", pa.string()),
        pa.field("caption", pa.string()),
        # clip-retrieval joins search hits to samples by `key`: here the sample's uid (written into every
        # shard's {key}.json; a sample repeated by the mixer has one uid and several shard keys).
        pa.field("key", pa.string()),
        pa.field("uid", pa.string()),
        pa.field("source", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("class_name", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("clip_score", pa.float32()),
    ]
)

IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
HF_ROWS = pa.schema([pa.field("image", IMAGE_STRUCT)]
                    + [f for f in SHARD_META if f.name not in ("status", "error_message", "exif")])

# excluded/<stage>/*.parquet: every dropped row, with why.
EXCLUDED = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("drop_reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)

ALL: dict[str, pa.Schema] = {
    "ingest": INGEST,
    "descriptions": DESCRIPTIONS,
    "pairs": PAIRS,
    "scores": SCORES,
    "manifest": MANIFEST,
    "shard_meta": SHARD_META,
    "hf_rows": HF_ROWS,
    "excluded": EXCLUDED,
    "embedding_metadata": EMBEDDING_METADATA,
}


def schema_to_json(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def dump_all() -> dict[str, str]:
    """JSON text per schema name, as committed in schemas/tables/."""
    return {name: json.dumps(schema_to_json(s), indent=2) + "\n" for name, s in ALL.items()}
