"""Score stage: CLIP/SigLIP scores per pair, per-row filters, dedup and eval decontamination.

Stages (run by the executor, :mod:`pipeline.executor`): :class:`ScoreStage` (one unit per ingest
part) and :class:`FilterStage` (one unit over every scored part).
"""

from ..devices import cpu_has_fast_bf16
from .encoder import Encoder, get_encoder, resolve_device_dtype
from .preprocess import ImageTransform, PreprocessError
from .stage import FINAL_STAGE, STAGE, FilterStage, ScoreStage, load_summary, part_number, score_pairs, summary_rows

__all__ = [
    "Encoder", "FilterStage", "ImageTransform", "PreprocessError", "STAGE", "FINAL_STAGE", "ScoreStage",
    "cpu_has_fast_bf16", "get_encoder", "load_summary", "part_number", "resolve_device_dtype", "score_pairs",
    "summary_rows",
]
