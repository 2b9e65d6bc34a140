"""Fixtures of the reliability drill: one Prefect API server, one LLM test server, one reference run.

The Prefect server is the session's test server (``prefect_harness``, a real uvicorn API server on
127.0.0.1 with a temporary SQLite database); every build child process is pointed at it through
``PREFECT_API_URL``, so none of them starts its own ephemeral server.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ (llm_server, hostile)
sys.path.insert(0, str(HERE))

from chaos_harness import (PLANTED_VLLM, Expect, all_class_names, build_env, drill_recipe,  # noqa: E402
                           run_build, shard_bytes)
from llm_server import LLMServer  # noqa: E402


@pytest.fixture(scope="session")
def api_url(prefect_harness) -> str:
    """URL of the session's Prefect API server, for build child processes."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the Prefect test harness did not set an API URL"
    return url


@pytest.fixture(scope="session")
def llm():
    """Scripted OpenAI-compatible server that requires the planted API key; requests take 0.2 s."""
    srv = LLMServer("scripted", classes=all_class_names(), api_key=PLANTED_VLLM, delay=0.2, retry_after="0.2",
                    slow_seconds=3.0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def reference(tmp_path_factory, api_url, llm, tiny_clip_dir) -> dict:
    """An uninterrupted build of the drill recipe (LLM captions), with planted secrets in its env."""
    tmp = tmp_path_factory.mktemp("chaos-ref")
    recipe = drill_recipe(tmp, tiny_clip_dir, llm.base_url)
    out = tmp / "run"
    t0 = time.monotonic()
    requests_before = llm.requests
    b = run_build(recipe, out, build_env(api_url), tmp / "logs" / "reference.log")
    return {"tmp": tmp, "recipe": recipe, "out": out, "exp": Expect.from_run(out), "log": b.log,
            "shards": shard_bytes(out), "seconds": time.monotonic() - t0,
            "llm_requests": llm.requests - requests_before}
