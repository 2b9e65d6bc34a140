"""End to end: the documented local Prefect setup runs the demo deployment.

``scripts/prefect_local.sh start`` starts a real Prefect server (SQLite, 127.0.0.1) and a process
worker in a temporary state folder, creates the pool and deploys prefect.yaml; then
``prefect deployment run build-alive/demo --watch`` (small -p overrides) must finish Completed with
shards on disk; ``stop`` must end every process it started and restore the Prefect profile.

Heavy (a server, a worker and a flow-run process start): marked slow; select it with
``pytest tests/test_operate_e2e.py -m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_COLORS="false",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    return env


def _small_demo_overrides() -> dict:
    from pipeline.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    o = {f"sources.{i}.per_class": 3 for i, s in enumerate(r.sources) if s.kind == "synthetic"}
    o.update({"ingest.processes": 1, "train.enabled": False, "eval.enabled": False, "write.samples_per_shard": 16})
    return o


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_deployment_runs_on_a_local_server_and_worker(tmp_path):
    from pipeline.ops.local_prefect import free_port

    home, state, out = tmp_path / "home", tmp_path / "state", tmp_path / "demo-run"
    home.mkdir()
    env = _env(home)
    script = str(ROOT / "scripts" / "prefect_local.sh")
    port = free_port()
    started = subprocess.run([script, "start", "--state-dir", str(state), "--port", str(port), "--no-ui"],
                             env=env, capture_output=True, text=True, timeout=420)
    info = json.loads((state / "state.json").read_text()) if (state / "state.json").exists() else {}
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{port}/api" in started.stdout
        params = json.dumps({"out": str(out), "overrides": _small_demo_overrides()})
        run = subprocess.run(["prefect", "deployment", "run", "build-alive/demo", "--watch", "--params", params],
                             env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log + (state / "logs" / "worker.log").read_text()[-5000:]
        assert "Completed" in log
        tars = sorted((out / "shards" / "wds").glob("*.tar"))
        hf = sorted((out / "shards" / "hf" / "data").glob("train-*.parquet"))
        assert tars and hf and len(tars) == len(hf)
        assert (out / "report" / "index.html").is_file()
    finally:
        stopped = subprocess.run([script, "stop", "--state-dir", str(state)], env=env, capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0 and "worker" in stopped.stdout and "server" in stopped.stdout
    for key in ("server_pid", "worker_pid"):
        assert info.get(key) and not _alive(info[key]), key
    profiles = (home / "profiles.toml").read_text()
    assert 'active = "alive-local"' not in profiles  # the caller's profile is back
    from pipeline.ops.local_prefect import _port_free

    assert _port_free(port)
