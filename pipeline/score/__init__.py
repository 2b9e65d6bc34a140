"""Score stage: CLIP/SigLIP scores per pair, per-row filters, dedup and eval decontamination.

Entry points (called per part and once per run by the flow and the CLI):

- :func:`run_part` (recipe, store, source, part_path) -> StageStats
- :func:`finalize` (recipe, store) -> StageStats
"""

from .encoder import Encoder, cpu_has_fast_bf16, get_encoder, resolve_device_dtype
from .preprocess import ImageTransform, PreprocessError
from .stage import FINAL_STAGE, STAGE, finalize, load_summary, part_number, run_part, score_pairs, summary_rows

__all__ = [
    "Encoder", "ImageTransform", "PreprocessError", "STAGE", "FINAL_STAGE", "cpu_has_fast_bf16", "finalize",
    "get_encoder", "load_summary", "part_number", "resolve_device_dtype", "run_part", "score_pairs", "summary_rows",
]
