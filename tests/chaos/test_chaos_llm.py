"""LLM server faults during describe, through the whole flow (the `alive build` CLI, in process).

The server answers with 500 bursts, a 429 storm (Retry-After), hangs past the client timeout,
connection resets and garbage bodies, and one class (tilapia) gets HTTP 500 on every request. The
build must finish: every class described or explicitly failed (``request_failed``), the failed class
left out of the shards with its reason. A re-run with a healthy server asks only for what is
missing (counted on the server) and ends with the descriptions of an undisturbed run, byte for byte.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
import yaml

from chaos_harness import (PLANTED_VLLM, all_class_names, build, check_run, drill_recipe, record,
                           results_path, temp_files)
from llm_server import LLMServer

pytestmark = pytest.mark.chaos
FAULTS = ["500"] * 6 + ["429"] * 12 + ["slow"] * 3 + ["reset"] * 4 + ["malformed"] * 4
FAILING = "tilapia"


def _classes_in_shards(out) -> Counter:
    c: Counter = Counter()
    for tar in sorted((out / "shards" / "wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    c[json.loads(tf.extractfile(m).read())["class_name"]] += 1
    return c


@pytest.mark.timeout(1200)
def test_llm_faults_then_rerun_fills_gaps_from_cache(tmp_path, prefect_harness, tiny_clip_dir, reference, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", PLANTED_VLLM)
    srv = LLMServer("scripted", classes=all_class_names(), api_key=PLANTED_VLLM, delay=0.05, retry_after="0.2",
                    slow_seconds=2.5).start()
    try:
        recipe = drill_recipe(tmp_path, tiny_clip_dir, srv.base_url, score={"enabled": False})
        data = yaml.safe_load(recipe.read_text())
        # same prompts and sampling as the reference run; a short timeout (hangs) and retries enough for the storm
        data["describe"].update(timeout=1.0, max_retries=8)
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        out = tmp_path / "run"

        srv.inject(*FAULTS)
        srv.fail_when[FAILING] = "500"
        code, text = build(recipe, out)
        assert code == 0, text
        served = dict(srv.faults_served)
        assert not srv.faults, "not every queued fault was served"
        assert all(served.get(k, 0) >= n for k, n in Counter(FAULTS).items()), served
        first = list(srv.log)
        answered = {e["digest"] for e in first if e["status"] == 200}
        assert all(FAILING not in e["prompt"] for e in first if e["status"] == 200)

        desc = pq.read_table(out / "describe" / "descriptions.parquet").to_pylist()
        by_class: dict[str, list[dict]] = {}
        for r in desc:
            by_class.setdefault(r["class_name"], []).append(r)
        assert set(by_class) == set(all_class_names())  # every class is in the table: described or explicitly failed
        for c, rows in by_class.items():
            failed = [r for r in rows if (r["reject_reason"] or "").startswith("request_failed")]
            if c == FAILING:
                assert failed == rows and not any(r["kept"] for r in rows)
                assert "HTTP 500" in rows[0]["reject_reason"]
            else:
                assert not failed and any(r["kept"] for r in rows), c
        marker = json.loads((out / "done" / "describe" / "all.json").read_text())
        assert marker["complete"] is False  # not done: the next run retries
        assert "FAILED" in text or "failed" in text
        in_shards = _classes_in_shards(out)
        assert FAILING not in in_shards and in_shards  # the failed class is left out, the rest is written
        excluded = [r for p in sorted((out / "excluded" / "pair" / "fish").glob("*.parquet"))
                    for r in pq.read_table(p).to_pylist()]
        assert len(excluded) == 8 and {r["drop_reason"] for r in excluded} == {"no_description"}

        srv.fail_when.clear()
        srv.reset_counters()
        code, text = build(recipe, out)
        assert code == 0, text
        second = list(srv.log)
        assert second and all(FAILING in e["prompt"] for e in second), "the re-run asked for more than the gaps"
        assert not {e["digest"] for e in second} & answered, "an answered request was asked again"
        n_questions = len({r["question_id"] for r in by_class[FAILING]})
        assert len(second) == n_questions and all(e["status"] == 200 for e in second)
        assert json.loads((out / "done" / "describe" / "all.json").read_text())["complete"] is True
        ref = pq.read_table(reference["out"] / "describe" / "descriptions.parquet")
        assert pq.read_table(out / "describe" / "descriptions.parquet").equals(ref)
        assert _classes_in_shards(out)[FAILING] > 0
        counts = check_run(out)
        assert not temp_files(out)
        record(results_path(), {"drill": "llm_faults", "faults": dict(Counter(FAULTS)), "failing_class": FAILING,
                                "requests_run1": len(first), "answered_run1": len(answered),
                                "requests_run2": len(second), "reasked": 0, **counts})
    finally:
        srv.stop()
