"""The pipeline: one list of stages, in order, that every driver (flow, CLI, sweep) runs over the executor.

Each stage lives in the module named after it; this list only says the order. The data flows one
way: every stage reads only run-store files written by the stages before it.
"""

from __future__ import annotations

from .describe import DescribeStage
from .executor import Stage
from .ingest import IngestStage
from .mix import MixStage
from .pair import PairStage
from .report import ReportStage
from .score import FilterStage, ScoreStage
from .train.evaluate import EvalStage
from .train.train import TrainStage
from .write import WriteIndexStage, WritePlanStage, WriteShardStage

STAGES: tuple[Stage, ...] = (
    IngestStage(),      # sources -> ingest/<source>/part-NNNNN.parquet
    DescribeStage(),    # classes -> describe/descriptions.parquet
    PairStage(),        # ingest parts x descriptions -> caption candidates
    ScoreStage(),       # CLIP score per pair, embeddings
    FilterStage(),      # decontamination, dedup, top fraction -> score/selection.parquet
    MixStage(),         # shares, class balance -> mix/manifest.parquet
    WritePlanStage(),   # order, shard rows, routes
    WriteShardStage(),  # webdataset + HF parquet shards
    WriteIndexStage(),  # sizes.json, dataset card
    TrainStage(),       # CLIP fine-tune on the shards
    EvalStage(),        # zero-shot eval
    ReportStage(),      # summary.json, report/index.html
)
STAGE_NAMES = tuple(s.name for s in STAGES)
