"""Secrets: with HF_TOKEN and VLLM_API_KEY planted in the build's environment, nothing keeps them.

The reference run (and every kill-drill run, when they ran first) had both in its environment; the
LLM test server only answers requests that carry the planted API key, so the key was in use. No
file of the run folders, no captured stdout/stderr, and no row of the Prefect API database (logs,
flow parameters, task inputs, artifacts) may contain either value.
"""

from __future__ import annotations

import pytest

from chaos_harness import PLANTED_HF, PLANTED_VLLM, record, results_path, scan_for, scan_prefect_db

pytestmark = pytest.mark.chaos


def test_planted_secrets_never_reach_files_logs_or_prefect(reference, llm):
    assert f"Bearer {PLANTED_VLLM}" in llm.auth_headers  # the key was sent, so it was read from the env
    assert reference["llm_requests"] > 0
    tmp = reference["tmp"]
    runs = sorted(p.parent for p in tmp.rglob("recipe.resolved.yaml"))
    logs = sorted((tmp / "logs").glob("*.log"))
    assert runs and logs and all(p.stat().st_size > 0 for p in logs)
    n_files = sum(1 for p in tmp.rglob("*") if p.is_file())
    hits = scan_for([PLANTED_HF, PLANTED_VLLM], [tmp])
    assert not hits, hits
    db_hits, counts = scan_prefect_db([PLANTED_HF, PLANTED_VLLM])
    assert not db_hits, db_hits
    assert counts["log"] > 0 and counts["artifact"] > 0 and counts["flow_run"] > 0  # the scan saw real rows
    record(results_path(), {"drill": "secrets", "run_folders": len(runs), "files_scanned": n_files,
                            "captured_logs": len(logs), "prefect_rows": counts, "hits": 0})
