"""Shared pieces of the reliability drill: the drill recipe, build processes, stage observation, checks.

A build runs as ``python tests/chaos/build_proc.py build ...`` (the ``alive build`` CLI) in its own
process group so ``os.killpg(..., SIGKILL)`` takes its ingest workers down with it. Which stage a
kill hit is read from the run folder (done markers and files appear in stage order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILD_PROC = Path(__file__).resolve().parent / "build_proc.py"
STAGES = ("ingest", "describe", "pair", "score", "filter", "mix", "write", "report", "finished")
# Stages the issue names; pair and filter are reported as their own stages but are short.
DRILL_STAGES = ("ingest", "describe", "score", "mix", "write", "report")
PLANTED_HF = "hf_CHAOSplantedTOKEN0000mustNEVERleak9999"
PLANTED_VLLM = "sk-chaos-PLANTED-vllm-key-7f3e9a1b2c"
LLM_MODEL = "tiny-lm"

CLASSES = {
    "leaves": ("crops", ["tomato late blight", "apple scab", "corn common rust"]),
    "fish": ("fishery", ["atlantic salmon", "tilapia"]),
    "general": ("general", ["red car", "blue house"]),
}


def drill_recipe(tmp: Path, clip_dir: Path, llm_url: Optional[str], **over: Any) -> Path:
    """The drill's recipe: synthetic sources, small parts and shards, tiny CLIP, LLM or template captions."""
    describe: dict[str, Any] = {"backend": "template"}
    if llm_url:
        describe = {"backend": "openai", "base_url": llm_url, "model": LLM_MODEL, "n_per_question": 2,
                    "concurrency": 4, "timeout": 10.0, "max_retries": 4, "backoff_base": 0.05,
                    "backoff_max": 0.2, "clip_tokenizer": str(clip_dir)}
    r: dict[str, Any] = {
        "name": "chaos-drill", "seed": 11, "image_size": 64,
        "sources": [
            {"name": "leaves", "kind": "synthetic", "domain": "crops", "size": 80, "per_class": 8,
             "classes": CLASSES["leaves"][1], "context": "crop leaf", "licence": "CC0-1.0"},
            {"name": "fish", "kind": "synthetic", "domain": "fishery", "size": 80, "per_class": 8,
             "classes": CLASSES["fish"][1], "licence": "CC0-1.0"},
            {"name": "general", "kind": "synthetic", "domain": "general", "size": 80, "per_class": 6,
             "captioned": True, "classes": CLASSES["general"][1], "licence": "CC0-1.0"},
        ],
        "ingest": {"part_size": 8, "processes": 1},
        "describe": describe,
        "score": {"model": str(clip_dir), "batch_size": 32, "min_score": None,
                  "dedup": {"exact": True, "near_cosine": None}, "decontaminate": False},
        "mix": {"shares": {"crops": 0.5, "fishery": 0.3, "general": 0.2}, "max_repeats": 2},
        "write": {"samples_per_shard": 8, "formats": ["webdataset", "hf"]},
    }
    for k, v in over.items():
        r[k] = v
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def all_class_names() -> list[str]:
    return [c for _, cs in CLASSES.values() for c in cs]


# ----------------------------------------------------------------------------- processes
def build_env(api_url: str, slow_write: float = 0.0, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_TOKEN": PLANTED_HF, "VLLM_API_KEY": PLANTED_VLLM, "PYTHONPATH": str(ROOT),
           "ALIVE_CHAOS_SLOW_WRITE": str(slow_write)}
    env.update(extra)
    return env


@dataclass
class Build:
    """One ``alive build`` child process with its captured output."""

    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)
    wall_start: float = field(default_factory=lambda: time.time() - 0.01)

    def wait(self, timeout: float = 900) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: flow process and ingest workers
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_build(recipe: Path, out: Path, env: dict[str, str], log: Path, *extra: str) -> Build:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")
    fh.write(f"\n===== build {out} {' '.join(extra)} =====\n".encode())
    fh.flush()
    cmd = [sys.executable, str(BUILD_PROC), "build", "--recipe", str(recipe), "--out", str(out), "--no-progress",
           *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    return Build(proc, log)


def run_build(recipe: Path, out: Path, env: dict[str, str], log: Path, timeout: float = 900) -> Build:
    b = start_build(recipe, out, env, log)
    rc = b.wait(timeout)
    assert rc == 0, f"build into {out} exited {rc}:\n{b.output()[-4000:]}"
    return b


def alive(*args: str) -> tuple[int, str]:
    """Run the `alive` CLI in this process; returns (exit code, stdout + stderr).

    An exception the CLI did not turn into a message is appended as ``UNCAUGHT <type>: <message>``.
    """
    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(app, list(args))
    text = res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        text += f"\nUNCAUGHT {type(res.exception).__name__}: {res.exception}"
    return res.exit_code, text


def build(recipe: Path, out: Path, *sets: str) -> tuple[int, str]:
    """`alive build` in this process (the flow talks to the session's Prefect server)."""
    args = ["build", "--recipe", str(recipe), "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return alive(*args)


# ----------------------------------------------------------------------------- stage observation
@dataclass
class Expect:
    """Unit counts of a finished run (from the reference run), to tell how far a run got."""

    ingest: int
    pair: int
    score: int
    shards: int

    @classmethod
    def from_run(cls, out: Path) -> "Expect":
        def n(stage: str, sub: str = "") -> int:
            return len(list((out / "done" / stage / sub).rglob("*.json")))

        return cls(n("ingest"), n("pair"), n("score"), n("write"))


def observe_stage(out: Path, exp: Expect) -> str:
    """The stage a run in ``out`` is in (the first one whose outputs are not all there)."""
    done = out / "done"

    def n(stage: str, sub: str = "") -> int:
        d = done / stage / sub
        return len(list(d.rglob("*.json"))) if d.exists() else 0

    if n("ingest") < exp.ingest:
        return "ingest"
    if not (done / "describe" / "all.json").exists():
        return "describe"
    if n("pair") < exp.pair:
        return "pair"
    if n("score") < exp.score:
        return "score"
    if not (done / "filter" / "all.json").exists():
        return "filter"
    if not (done / "mix" / "all.json").exists():
        return "mix"
    if n("write") < exp.shards or not (out / "shards" / "hf" / "README.md").exists() \
            or not (out / "shards" / "wds" / "sizes.json").exists():
        return "write"
    if not (out / "report" / "index.html").exists() or not (out / "summary.json").exists():
        return "report"
    return "finished"


def stage_rank(stage: str) -> int:
    return STAGES.index(stage)


def flow_started(out: Path, since: float) -> bool:
    """Whether a flow run began after wall time ``since`` (it rewrites recipe.resolved.yaml first)."""
    try:
        return (out / "recipe.resolved.yaml").stat().st_mtime >= since
    except OSError:
        return False


def wait_for_stage(build: Build, out: Path, exp: Expect, stage: str, timeout: float = 600) -> str:
    """Poll until this build's flow reaches ``stage`` (or a later one, or exits); returns the stage seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not flow_started(out, build.wall_start):
            if build.proc.poll() is not None:
                return "exited"
            time.sleep(0.02)
            continue
        seen = observe_stage(out, exp)
        if stage_rank(seen) >= stage_rank(stage) or build.proc.poll() is not None:
            return seen
        time.sleep(0.02)
    raise TimeoutError(f"run {out} did not reach {stage} in {timeout}s (at {observe_stage(out, exp)})")


# ----------------------------------------------------------------------------- checks
def temp_files(out: Path) -> list[str]:
    """Files an interrupted atomic write leaves (``.<name>.<random>.tmp``)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp"))


def shard_bytes(out: Path) -> dict[str, bytes]:
    root = out / "shards"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def readable_everywhere(out: Path) -> list[str]:
    """Problems with files in place: every parquet, JSON and tar that exists must be whole."""
    bad = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name.endswith(".tmp") or "describe/cache.sqlite" in p.as_posix():
            continue
        try:
            if p.suffix == ".parquet":
                pq.read_table(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".tar":
                with tarfile.open(p) as tf:
                    tf.getmembers()
        except Exception as e:  # noqa: BLE001 - report every broken file
            bad.append(f"{p.relative_to(out)}: {type(e).__name__}: {e}")
    return bad


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def check_run(out: Path) -> dict[str, Any]:
    """Cross-check a finished run: shards vs manifest vs selection vs ingest; returns counts.

    Raises AssertionError naming the first disagreement.
    """
    wds = out / "shards" / "wds"
    sizes = json.loads((wds / "sizes.json").read_text())
    copies: list[tuple[str, int]] = []  # (uid, repeat) of every sample in the tars
    keys: list[str] = []
    meta_by_uid: dict[str, dict] = {}
    for name in sorted(sizes):
        tar = wds / name
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                assert m.isfile() and "/" not in m.name and not m.name.startswith("."), f"{tar}: member {m.name!r}"
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
        assert len(samples) == sizes[name], f"{name}: {len(samples)} samples, sizes.json says {sizes[name]}"
        side = pq.read_table(wds / name.replace(".tar", ".parquet"))
        assert side["key"].to_pylist() == sorted(samples), f"{name}: sidecar keys differ from tar keys"
        for key, parts in sorted(samples.items()):
            assert set(parts) == {"jpg", "txt", "json"}, f"{name}/{key}: members {sorted(parts)}"
            meta = json.loads(parts["json"])
            assert meta["key"] == key
            copies.append((meta["uid"], meta["repeat"]))
            keys.append(key)
            meta_by_uid[meta["uid"]] = {**meta, "caption": parts["txt"].decode()}
    dup_keys = [k for k, c in Counter(keys).items() if c > 1]
    dup_copies = [k for k, c in Counter(copies).items() if c > 1]
    assert not dup_keys, f"duplicate keys in the shards: {dup_keys[:5]}"
    assert not dup_copies, f"duplicate samples in the shards: {dup_copies[:5]}"

    manifest = pq.read_table(out / "mix" / "manifest.parquet")
    expected = {(u, r) for u, n in zip(manifest["uid"].to_pylist(), manifest["repeats"].to_pylist())
                for r in range(n)}
    missing = expected - set(copies)
    extra = set(copies) - expected
    assert not missing, f"{len(missing)} manifest samples missing from the shards, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} samples in the shards not in the manifest, e.g. {sorted(extra)[:3]}"

    scored = out / "score" / "selection.parquet"
    sel = pq.read_table(scored if scored.exists() else out / "write" / "selection.parquet")
    kept = sel.filter(sel["keep"])
    kept_uids = set(kept["uid"].to_pylist())
    assert set(manifest["uid"].to_pylist()) <= kept_uids, "manifest names samples the score stage dropped"
    captions = dict(zip(kept["uid"].to_pylist(), kept["caption"].to_pylist()))
    for uid, meta in meta_by_uid.items():
        assert meta["caption"] == captions[uid], f"{uid}: shard caption differs from score/selection.parquet"

    ingested: dict[str, str] = {}
    for p in sorted((out / "ingest").glob("[!_]*/part-*.parquet")):
        t = pq.read_table(p, columns=["uid", "status"])
        for u, s in zip(t["uid"].to_pylist(), t["status"].to_pylist()):
            assert u not in ingested, f"uid {u} ingested twice ({p})"
            ingested[u] = s
    assert set(sel["uid"].to_pylist()) <= {u for u, s in ingested.items() if s == "success"}, \
        "selection names samples that were not ingested successfully"

    hf_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "shards" / "hf" / "data").glob("*.parquet"))
    assert hf_rows == len(copies) == sum(sizes.values()), (hf_rows, len(copies), sum(sizes.values()))
    assert not (out / "write" / "_spool").exists(), "the write spool was not cleaned up"
    return {"samples": len(copies), "distinct": len({u for u, _ in copies}), "ingested": len(ingested),
            "shards": len(sizes)}


def scan_for(needles: list[str], paths: list[Path]) -> list[str]:
    """Every file under ``paths`` that contains one of ``needles`` (as bytes)."""
    hits = []
    bneedles = [n.encode() for n in needles]
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in files:
            data = p.read_bytes()
            for n in bneedles:
                if n in data:
                    hits.append(f"{p}: {n.decode()[:6]}...")
    return hits


def scan_prefect_db(needles: list[str]) -> tuple[list[str], dict[str, int]]:
    """Rows of the Prefect API database (logs, parameters, artifacts...) that contain a needle."""
    import sqlite3

    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    db = Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    hits: list[str] = []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        counts = {t: con.execute(f'select count(*) from "{t}"').fetchone()[0] for t in ("log", "artifact", "flow_run")}
        for t in tables:
            for row in con.execute(f'select * from "{t}"'):
                r = repr(row)
                hits += [f"{t}: {n[:6]}..." for n in needles if n in r]
    finally:
        con.close()
    for p in db.parent.glob(db.name + "*"):
        hits += [f"{p}: {n[:6]}..." for n in needles if n.encode() in p.read_bytes()]
    return hits, counts


def record(results: Optional[Path], row: dict[str, Any]) -> None:
    """Append one result row (JSON line) where ALIVE_CHAOS_RESULTS points, for docs/reliability.md."""
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def results_path() -> Optional[Path]:
    p = os.environ.get("ALIVE_CHAOS_RESULTS")
    return Path(p) if p else None
