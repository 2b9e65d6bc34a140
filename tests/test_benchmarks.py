"""Every benchmark runs at a tiny size (not timed: shape and correctness only), and the README's table
is exactly what benchmarks/table.py makes of the committed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import table  # noqa: E402

TINY = {
    "ingest_vs_img2dataset": ["--n", "8", "--rounds", "1", "--fixed-rounds", "0", "--no-warmup"],
    "score_vs_naive": ["--tiny", "--images", "12", "--batch", "8", "--k", "2", "--rounds", "1", "--dtypes", "fp32",
                       "--measure-seconds", "0.2"],
    "mix_scale": ["--rows", "20000", "--rounds", "1"],
    "describe_overhead": ["--classes", "2", "--rounds", "1", "--latency", "0.2", "--no-warmup"],
    "neardup_100k": ["--n", "1500", "--rounds", "1"],
}
KEYS = {"benchmark", "ours", "baseline", "unit", "speedup", "rounds", "target", "met"}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


@pytest.mark.parametrize("name", list(TINY))
def test_benchmark_runs_tiny(name: str, tiny_results: Path, tmp_path: Path) -> None:
    out = tiny_results / f"{name}.json"
    args = TINY[name] + ["--results", str(out)]
    if name == "ingest_vs_img2dataset":
        args += ["--images", str(tmp_path / "photos")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert KEYS <= set(last), set(KEYS) - set(last)
    assert last["benchmark"] == name and last["ours"] > 0 and last["baseline"] > 0 and last["speedup"] > 0
    raw = json.loads(out.read_text())
    assert raw["summary"] == last
    assert raw["machine"]["cores"] and raw["versions"]
    rounds = raw["rounds"] or next(v for k, v in raw.items() if k.startswith("rounds_by_"))
    flat = rounds if isinstance(rounds, list) else [r for rr in rounds.values() for r in rr]
    assert flat and all("load_before" in side for r in flat for side in r.values() if isinstance(side, dict))
    # correctness, not speed
    if name == "score_vs_naive":
        assert last["per_dtype"]["fp32"]["ours_vs_docs_max_abs"] < 5e-3
    if name == "mix_scale":
        assert last["same_bucket_rows"] == {"polars": True, "pandas": True} and last["max_share_error_pt"] < 0.01
    if name == "neardup_100k":
        assert last["recall"] >= 0.99 and last["precision"] >= 0.99  # pairs at tau itself may round either way
    if name == "describe_overhead":
        assert set(last["servers"]) == {"fast", "realistic"} and last["clip_tokenizer"]


def test_table_renders_tiny_results(tiny_results: Path) -> None:
    if len(list(tiny_results.glob("*.json"))) < len(TINY):
        pytest.skip("a tiny benchmark run failed (reported by its own test)")
    text = table.table(tiny_results)
    rows = [line for line in text.splitlines() if line.startswith("| `benchmarks/")]
    for name in TINY:  # every tiny run renders its row (benchmarks not run here show as "not measured")
        row = next(r for r in rows if r.startswith(f"| `benchmarks/{name}.py`"))
        assert "not measured" not in row, row


def test_readme_table_is_generated_from_committed_results() -> None:
    readme = (ROOT / "README.md").read_text()
    assert table.readme_block(readme) == table.table(), "run: python benchmarks/table.py --write"
