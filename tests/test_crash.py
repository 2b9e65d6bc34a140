"""Kill -9 the build mid-ingest, re-run it, and compare the shards byte for byte with a clean run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

RECIPE = {
    "name": "crash", "seed": 1, "image_size": 96,
    "sources": [
        {"name": "leaves", "kind": "synthetic", "domain": "crops", "per_class": 40, "size": 640,
         "classes": ["tomato late blight", "tomato healthy", "apple scab", "corn common rust"]},
        {"name": "fish", "kind": "synthetic", "domain": "fishery", "per_class": 20, "size": 640,
         "classes": ["atlantic salmon", "tilapia"]},
    ],
    "ingest": {"part_size": 8, "processes": 1},
    "score": {"enabled": False}, "mix": {"enabled": False},
    "write": {"samples_per_shard": 50},
}


def _build(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", "--recipe", str(recipe), "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _shards(out: Path) -> dict[str, bytes]:
    root = out / "shards"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill_mid_ingest_then_resume_is_byte_identical(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    clean = _build(recipe, tmp_path / "clean")
    assert clean.wait(timeout=600) == 0, clean.stdout.read().decode()[-3000:]

    out = tmp_path / "killed"
    proc = _build(recipe, out)
    done = out / "done" / "ingest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        n = len(list(done.rglob("*.json"))) if done.exists() else 0
        if n >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(done.rglob("*.json")))
    assert 3 <= n_done < 20  # 20 parts in all: it died mid-ingest
    assert not (out / "shards").exists()

    again = _build(recipe, out)
    assert again.wait(timeout=600) == 0, again.stdout.read().decode()[-3000:]
    got, want = _shards(out), _shards(tmp_path / "clean")
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if differ:
        import difflib

        detail = [f"differing files: {differ}"]
        for k in differ:
            if k.endswith((".md", ".json")) and k in got and k in want:
                detail += difflib.unified_diff(want[k].decode().splitlines(), got[k].decode().splitlines(), "clean/" + k,
                                               "resumed/" + k, lineterm="", n=1)
        raise AssertionError("\n".join(detail))
    leftovers = [p for p in out.rglob("*.tmp")]
    assert not leftovers
