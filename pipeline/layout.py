"""Run-store layout: the one module that names every artifact of a run folder.

Every name is a POSIX path relative to the run folder; :meth:`pipeline.store.RunStore.path` turns
it into a checked absolute path. Stages, the executor, the flow, the report and the tools ask this
module for a name instead of spelling it out, so moving an artifact is a one-line change.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- run level
RECIPE = "recipe.resolved.yaml"
SUMMARY = "summary.json"
DONE = "done"          # done/<stage>/<unit>.json: one marker per finished unit (pipeline.executor)
STATS = "stats"        # stats/<stage>/<unit>.json: the unit's StageStats
EXCLUDED = "excluded"  # excluded/<stage>/<unit>.parquet: rows a unit dropped, with the reason


def part(i: int) -> str:
    """Name of part ``i`` of a source (also the unit name's last component)."""
    return f"part-{i:05d}"


def part_index(name: str) -> int:
    """Inverse of :func:`part`: ``part-00012`` (or ``part-00012.parquet``) -> 12."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    try:
        prefix, num = stem.split("-", 1)
        if prefix != "part":
            raise ValueError
        return int(num)
    except ValueError:
        raise ValueError(f"{name!r} is not a part name (expected part-NNNNN)") from None


def source_unit(source: str, i: int) -> str:
    return f"{source}/{part(i)}"


def marker(stage: str, unit: str) -> str:
    return f"{DONE}/{stage}/{unit}.json"


def stats_file(stage: str, unit: str) -> str:
    return f"{STATS}/{stage}/{unit.replace('/', '__')}.json"


def excluded(stage: str, unit: str) -> str:
    return f"{EXCLUDED}/{stage}/{unit}.parquet"


# ----------------------------------------------------------------------------- ingest
INGEST = "ingest"
INGEST_SPOOL = "ingest/_raw"  # sources that must be materialised before they can be split into parts


def ingest_part(source: str, i: int) -> str:
    return f"{INGEST}/{source}/{part(i)}.parquet"


# ----------------------------------------------------------------------------- describe
DESCRIPTIONS = "describe/descriptions.parquet"
DESCRIBE_CACHE = "describe/cache.sqlite"


# ----------------------------------------------------------------------------- pair / score
def pair_part(source: str, i: int) -> str:
    return f"pair/{source}/{part(i)}.parquet"


def score_part(source: str, i: int) -> str:
    return f"score/{source}/{part(i)}.parquet"


SELECTION = "score/selection.parquet"
SCORE_SUMMARY = "score/summary.json"
EMBEDDINGS = {"train": "score/embeddings", "eval": "score/eval_embeddings"}


def embedding_files(role: str, n: str) -> dict[str, str]:
    """clip-retrieval's file set number ``n`` (img_emb, text_emb for train parts, metadata), or the
    ``_empty`` record of a part with no embedded image (clip-retrieval's readers never see it)."""
    root = EMBEDDINGS[role]
    return {"img": f"{root}/img_emb/img_emb_{n}.npy", "text": f"{root}/text_emb/text_emb_{n}.npy",
            "meta": f"{root}/metadata/metadata_{n}.parquet", "empty": f"{root}/_empty/{n}.json"}


# ----------------------------------------------------------------------------- mix
MANIFEST = "mix/manifest.parquet"
MIX_REPORT = "mix/mix_report.json"


# ----------------------------------------------------------------------------- write
WRITE_PLAN = "write/plan.json"
WRITE_ORDER = "write/order.parquet"          # uid, repeat, pos, shard, bucket: the final sample order
WRITE_SELECTION = "write/selection.parquet"  # the kept samples' captions + metadata (no images)
WRITE_SPOOL = "write/_spool"                 # scratch: images routed to their shards, removed at the end


def write_rows(shard: int) -> str:
    """Rows of one shard in order (no image bytes), with the ingest part holding each image."""
    return f"write/rows/{shard:05d}.parquet"


def write_route(source: str, i: int) -> str:
    """(uid, pos, shard) of the samples of one ingest part that go into the shards."""
    return f"write/route/{source}/{part(i)}.parquet"


def spool_file(plan_digest: str, shard: int, source: str, i: int) -> str:
    return f"{WRITE_SPOOL}/{plan_digest}/{shard:05d}/{source}__{part(i)}.parquet"


WDS = "shards/wds"
SIZES = "shards/wds/sizes.json"
HF = "shards/hf"
HF_DATA = "shards/hf/data"
HF_CARD = "shards/hf/README.md"


def wds_files(shard: int) -> dict[str, str]:
    return {"tar": f"{WDS}/{shard:05d}.tar", "parquet": f"{WDS}/{shard:05d}.parquet",
            "stats": f"{WDS}/{shard:05d}_stats.json"}


def hf_file(shard: int, n_shards: int) -> str:
    return f"{HF_DATA}/train-{shard:05d}-of-{n_shards:05d}.parquet"


# ----------------------------------------------------------------------------- train / eval / report
TRAIN = "train"
TRAIN_FINAL = "train/final"
TRAIN_BASE = "train/base"
TRAIN_CHECKPOINTS = "train/checkpoints"
TRAIN_METRICS = "train/metrics.jsonl"
TRAIN_SUMMARY = "train/summary.json"
EVAL_RESULTS = "eval/results.json"
EVAL_MARKDOWN = "eval/results.md"
EVAL_PLOT = "eval/zero_shot.png"
REPORT = "report"
REPORT_INDEX = "report/index.html"
UPLOAD_RECORD = "upload/upload.json"
UPLOAD_STAGING = "upload/dataset"  # the folder upload_folder sends (shards/hf + optional webdataset)
MIXING_LAW = "mixing_law"
