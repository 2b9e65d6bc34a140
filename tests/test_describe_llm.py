"""LLM backends against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/llm_server.py).

Covers normal runs (chat and completions), n>1 and its fallback, bounded concurrency reached,
injected faults (500, 429 + Retry-After, slow past the timeout, malformed JSON, empty content,
connection reset, 400), a class that keeps failing, the API key, extra_body pass-through, the
request cache, kill -9 mid-run and resume with zero repeated requests, the tiny-model generator,
and the in-process transformers backend.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_server import TINY_LM_NAME, LLMServer, build_tiny_lm  # noqa: E402

from pipeline import layout  # noqa: E402
from pipeline.describe import ClassInfo, describe_classes, load_kept, summary_lines  # noqa: E402
from pipeline.describe.llm import DescribeError  # noqa: E402
from pipeline.describe.prompts import load_prompt_sets  # noqa: E402
from pipeline.recipe import DescribeConfig, parse_recipe  # noqa: E402
from pipeline.stats import StageStats  # noqa: E402
from pipeline.store import RunStore, write_parquet_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [ClassInfo("crops", "tomato early blight", "tomato leaf"), ClassInfo("fishery", "nile tilapia"),
           ClassInfo("livestock", "holstein cattle")]
GENERAL = [ClassInfo("general", "red bicycle"), ClassInfo("general", "wooden chair")]
N_GENERAL_Q = len(load_prompt_sets(DescribeConfig(), {"general"})["general"].spec.questions)


def n_questions(classes) -> int:
    sets = load_prompt_sets(DescribeConfig())
    return sum(len(sets[c.domain].prompts_for(c.class_name, c.context)) for c in classes)


def recipe(base_url: str, **describe):
    d = {"backend": "openai", "base_url": base_url, "model": TINY_LM_NAME, "n_per_question": 2,
         "clip_tokenizer": None, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 5.0, **describe}
    return parse_recipe({"name": "t", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops",
                                                   "classes": ["a"]}], "describe": d})


def descriptions_path(store):
    return store.path(layout.DESCRIPTIONS)


def run(r, store: RunStore, classes) -> StageStats:
    """The describe stage's work on a given class list (the stage itself lists the ingested classes)."""
    stats = StageStats("describe")
    write_parquet_atomic(descriptions_path(store), describe_classes(r.describe, store, classes, stats))
    return stats


def table(store):
    return pq.read_table(descriptions_path(store)).to_pylist()


@pytest.fixture
def server():
    srv = LLMServer("scripted", classes=[c.class_name for c in CLASSES + GENERAL]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-lm")


def ok_requests(srv):
    return [e for e in srv.log if e["status"] == 200]


def test_normal_chat_run_writes_descriptions_with_provenance(server, tmp_path):
    store = RunStore(tmp_path)
    stats = run(recipe(server.base_url, n_per_question=3), store, CLASSES)
    nq = n_questions(CLASSES)
    rows = table(store)
    # one request per (class, question), each asking n=3 in one go
    assert [e["n"] for e in ok_requests(server)] == [3] * nq and server.requests == nq
    assert all(e["chat"] for e in server.log)
    kept = [r for r in rows if r["kept"]]
    assert len({(r["class_name"], r["question_id"], r["sample_index"]) for r in kept}) >= nq * 3 * 0.8
    sets = load_prompt_sets(DescribeConfig())
    for r in rows:
        assert r["backend"] == "openai" and r["model"] == TINY_LM_NAME
        assert r["prompt_sha"] == sets[r["domain"]].sha
        assert json.loads(r["sampling"])["n"] == 3
        assert r["kept"] or r["reject_reason"]
    for r in kept:  # post-processed: mentions its class, no junk
        assert r["class_name"].split()[-1] in r["text"].lower()
        assert not r["text"].startswith(("Sure", "1.")) and "renowned" not in r["text"]
    c = stats.counters
    assert c["requests"] == nq and c["samples_generated"] == nq * 3 and c["failed_classes"] == 0
    assert c["tokens_out"] == server.tokens_out > 0 and c["tokens_in"] > 0 and stats.gauges["tokens_per_s"] > 0
    assert stats.total == len(rows) and stats.kept == len(kept) and stats.dropped  # junk rejected with reasons
    assert set(load_kept(store)) == {(c.domain, c.class_name) for c in CLASSES}
    text = "\n".join(summary_lines(stats))
    assert f"requests {nq} (ok {nq}, retries 0, failed 0)" in text and "tokens/s" in text
    assert {r["metric"] for r in stats.summary_rows()} >= {"requests", "tokens_in", "tokens_out", "tokens_per_s",
                                                           "cache_hit_rate", "failed_classes", "dropped_non_visual"}
    # done: a second call is skipped without any request
    run(recipe(server.base_url, n_per_question=3), store, CLASSES)
    assert server.requests == nq


def test_completions_api_and_extra_body_pass_through(server, tmp_path):
    extra = {"structured_outputs": {"regex": "[A-Z][^.]*\\."}, "repetition_penalty": 1.1}
    run(recipe(server.base_url, api="completions", extra_body=extra), RunStore(tmp_path), GENERAL)
    assert server.requests == 2 * N_GENERAL_Q
    # extra_body is merged last: its repetition_penalty wins over the prompt set's explicit 1.0
    assert all(not e["chat"] and e["extra"] == {"top_k": -1, "min_p": 0.0, **extra} for e in server.log)
    assert all("system:" not in e["prompt"] and e["prompt"].startswith(("Describe", "How", "What", "A caption"))
               for e in server.log)


def test_n_rejected_falls_back_to_one_request_per_sample(tmp_path, caplog):
    with LLMServer("scripted", reject_n=True) as srv:
        stats = run(recipe(srv.base_url, n_per_question=3, send_seed=True), RunStore(tmp_path), GENERAL)
        ok = ok_requests(srv)
        assert len(ok) == 2 * N_GENERAL_Q * 3 and all(e["n"] == 1 for e in ok)
        assert len({e["seed"] for e in ok}) == len(ok)  # each sample its own seed
        assert stats.counters["n_fallback"] == 1 and stats.counters["failed_classes"] == 0
        assert "refused n=3" in caplog.text
        assert stats.counters["samples_generated"] == 2 * N_GENERAL_Q * 3


def test_concurrency_is_bounded_and_reached(tmp_path):
    with LLMServer("scripted", delay=0.25) as srv:
        run(recipe(srv.base_url, concurrency=6), RunStore(tmp_path), CLASSES)
        assert srv.max_in_flight == 6


@pytest.mark.parametrize("fault,counter", [("500", "errors_http_500"), ("503", "errors_http_503"),
                                           ("slow", "errors_timeout"), ("malformed", "errors_malformed"),
                                           ("reset", "errors_connection")])
def test_transient_faults_are_retried(server, tmp_path, fault, counter):
    server.slow_seconds = 1.5
    server.inject(fault, fault)
    stats = run(recipe(server.base_url, timeout=0.5), RunStore(tmp_path), GENERAL)
    c = stats.counters
    assert server.faults_served[fault] == 2
    assert c[counter] == 2 and c["retries"] == 2 and c["failed_requests"] == 0 and c["failed_classes"] == 0
    assert c["requests"] == 2 * N_GENERAL_Q + 2
    assert c["samples_generated"] == 2 * N_GENERAL_Q * 2


def test_429_waits_for_retry_after(server, tmp_path):
    server.retry_after = "1"
    server.inject("429")
    stats = run(recipe(server.base_url, concurrency=1), RunStore(tmp_path), GENERAL)
    first = server.log[0]
    again = [e for e in server.log[1:] if e["digest"] == first["digest"]]
    assert first["status"] == 429 and [e["status"] for e in again] == [200]
    assert again[0]["t_start"] - first["t_end"] >= 1.0  # backoff alone would be <= 0.05 s
    assert stats.counters["errors_http_429"] == 1 and stats.counters["failed_classes"] == 0


def test_empty_content_is_recorded_not_retried(server, tmp_path):
    server.inject("empty")
    stats = run(recipe(server.base_url, concurrency=1), RunStore(tmp_path), GENERAL)
    rows = table(RunStore(tmp_path))
    empty = [r for r in rows if r["reject_reason"] == "empty_generation"]
    assert len(empty) == 2 and {r["sample_index"] for r in empty} == {0, 1}
    assert server.requests == 2 * N_GENERAL_Q and stats.counters["retries"] == 0
    assert stats.dropped["empty_generation"] == 2


def test_class_that_keeps_failing_is_recorded_and_retried_next_run(server, tmp_path, caplog):
    classes = GENERAL + [ClassInfo("general", "cursed lantern")]
    server.fail_when = {"cursed lantern": "500"}
    store = RunStore(tmp_path)
    r = recipe(server.base_url, max_retries=2)
    with caplog.at_level(logging.WARNING):
        stats = run(r, store, classes)
    rows = table(store)
    bad = [x for x in rows if x["class_name"] == "cursed lantern"]
    assert len(bad) == N_GENERAL_Q * 2 and not any(x["kept"] for x in bad)
    assert all(x["reject_reason"] == "request_failed: HTTP 500 after 3 attempts" for x in bad)
    assert all(any(x["kept"] for x in rows if x["class_name"] == c.class_name) for c in GENERAL)
    assert stats.counters["failed_classes"] == 1 and stats.counters["failed_requests"] == N_GENERAL_Q
    assert stats.dropped["request_failed"] == N_GENERAL_Q * 2
    assert any(rec.levelno == logging.ERROR and "1 of 3 classes FAILED" in rec.getMessage() for rec in caplog.records)
    # next run: the server is fixed; only the failed class is asked again, the rest comes from the cache
    server.fail_when = {}
    server.reset_counters()
    stats = run(r, store, classes)
    assert server.requests == N_GENERAL_Q and all("cursed lantern" in e["prompt"] for e in server.log)
    assert stats.counters["failed_classes"] == 0 and stats.counters["cache_hits"] == 2 * N_GENERAL_Q * 2


def test_non_retryable_error_fails_at_once(server, tmp_path):
    server.inject("400")
    stats = run(recipe(server.base_url, concurrency=1), RunStore(tmp_path), GENERAL)
    assert stats.counters["retries"] == 0 and stats.counters["failed_requests"] == 1
    assert stats.dropped["request_failed"] == 2
    assert server.requests == 2 * N_GENERAL_Q


def test_api_key_sent_from_env_and_never_logged(tmp_path, monkeypatch, caplog):
    secret = "sk-test-7f3a9c"
    monkeypatch.setenv("ALIVE_TEST_KEY", secret)
    with LLMServer("scripted", api_key=secret) as srv, caplog.at_level(logging.DEBUG):
        run(recipe(srv.base_url, api_key_env="ALIVE_TEST_KEY"), RunStore(tmp_path / "a"), GENERAL)
        assert srv.auth_headers and set(srv.auth_headers) == {f"Bearer {secret}"}
        assert secret not in caplog.text
        monkeypatch.setenv("ALIVE_TEST_KEY", "wrong")
        with pytest.raises(DescribeError, match=r"refused the API key.*\$ALIVE_TEST_KEY"):
            run(recipe(srv.base_url, api_key_env="ALIVE_TEST_KEY"), RunStore(tmp_path / "b"), GENERAL)


def test_unknown_model_and_unreachable_server_are_clear_errors(server, tmp_path):
    with pytest.raises(DescribeError, match="not served by .*it serves \\['tiny-lm'\\]"):
        run(recipe(server.base_url, model="llama-9000"), RunStore(tmp_path / "a"), GENERAL)
    with pytest.raises(DescribeError, match="cannot reach the LLM server"):
        run(recipe("http://127.0.0.1:9/v1", max_retries=1), RunStore(tmp_path / "b"), GENERAL)
    with pytest.raises(DescribeError, match="describe.model is required"):
        run(recipe(server.base_url, model=None), RunStore(tmp_path / "c"), GENERAL)


def test_request_cache_serves_a_changed_config_without_asking(server, tmp_path):
    store = RunStore(tmp_path)
    run(recipe(server.base_url), store, GENERAL)
    before = table(store)
    server.reset_counters()
    stats = run(recipe(server.base_url, concurrency=3), store, GENERAL)  # new fingerprint, same requests
    assert server.requests == 0 and stats.counters["cache_hits"] == stats.counters["samples"] == 2 * N_GENERAL_Q * 2
    assert stats.gauges["cache_hit_rate"] == 1.0
    assert table(store) == before
    # a sampling change is a different request: asked again
    run(recipe(server.base_url, temperature=0.5), store, GENERAL)
    assert server.requests == 2 * N_GENERAL_Q


_CHILD = """
import json, sys
from pipeline.describe import ClassInfo, describe_classes
from pipeline.recipe import parse_recipe
from pipeline.stats import StageStats
from pipeline.store import RunStore
spec = json.loads(sys.argv[1])
describe_classes(parse_recipe(spec["recipe"]).describe, RunStore(spec["store"]),
                 [ClassInfo(*c) for c in spec["classes"]], StageStats("describe"))
"""


def test_kill_mid_run_and_resume_asks_nothing_twice(server, tmp_path):
    r = recipe(server.base_url, n_per_question=3, concurrency=2)
    store = RunStore(tmp_path / "run")
    spec = {"recipe": r.model_dump(mode="json"), "store": str(store.root),
            "classes": [[c.domain, c.class_name, c.context] for c in CLASSES]}
    total = n_questions(CLASSES)
    server.delay = 0.01
    server.hold_after = 6  # answer 6 requests, then hold the rest until the client is dead
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = store.path("describe", "cache.sqlite")
    deadline = time.monotonic() + 60
    cached = 0
    while time.monotonic() < deadline and child.poll() is None:
        if server.answered == 6 and db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                    cached = con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            except sqlite3.OperationalError:
                cached = 0
            if cached == 18:
                break
        time.sleep(0.02)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    assert cached == 18
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    first = [e["digest"] for e in ok_requests(server)]
    assert len(first) == 6 and not descriptions_path(store).exists()

    server.reset_counters()
    server.release()
    stats = run(r, store, CLASSES)
    second = [e["digest"] for e in ok_requests(server)]
    assert set(first).isdisjoint(second) and len(set(second)) == len(second)  # nothing asked twice
    assert len(first) + len(second) == total
    assert stats.counters["cache_hits"] == 18 and stats.counters["samples_generated"] == (total - 6) * 3
    rows = table(store)
    assert {(x["class_name"], x["question_id"], x["sample_index"]) for x in rows} == {
        (c.class_name, q, i) for c in CLASSES for q in
        [p.question_id for p in load_prompt_sets(DescribeConfig())[c.domain].prompts_for(c.class_name, c.context)]
        for i in range(3)}
    assert not any((x["reject_reason"] or "").startswith("request_failed") for x in rows)


def test_openai_backend_against_the_tiny_model_server(tiny_lm_dir, tmp_path):
    with LLMServer("tiny", model_dir=tiny_lm_dir) as srv:
        stats = run(recipe(srv.base_url, max_tokens=12, require_class_mention=False), RunStore(tmp_path), GENERAL)
        assert stats.counters["tokens_out"] == srv.tokens_out > 0
        assert 0 < stats.counters["tokens_out"] <= 2 * N_GENERAL_Q * 2 * 12
        rows = table(RunStore(tmp_path))
        assert {(r["class_name"], r["sample_index"]) for r in rows} == {(c.class_name, i) for c in GENERAL
                                                                        for i in range(2)}
        assert all(r["kept"] or r["reject_reason"] for r in rows)


def test_transformers_backend_in_process_with_cache(tiny_lm_dir, tmp_path):
    store = RunStore(tmp_path)
    base = {"backend": "transformers", "model": str(tiny_lm_dir), "n_per_question": 2, "max_tokens": 10,
            "clip_tokenizer": None, "batch_size": 4, "device": "cpu"}
    r = parse_recipe({"name": "t", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops",
                                                "classes": ["a"]}], "describe": base})
    stats = run(r, store, GENERAL)
    c = stats.counters
    assert c["samples_generated"] == 2 * N_GENERAL_Q * 2 and c["requests"] == 2 * N_GENERAL_Q
    assert 0 < c["tokens_out"] <= 2 * N_GENERAL_Q * 2 * 10 and c["cache_hits"] == 0
    rows = table(store)
    assert {r["backend"] for r in rows} == {"transformers"}
    assert Counter(r["class_name"] for r in rows if r["reject_reason"] != "duplicate")
    # a changed non-sampling setting re-runs the stage but generates nothing: all from the cache
    r2 = parse_recipe({"name": "t", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops",
                                                 "classes": ["a"]}], "describe": {**base, "batch_size": 2}})
    stats2 = run(r2, store, GENERAL)
    assert stats2.counters["cache_hits"] == 2 * N_GENERAL_Q * 2 and stats2.counters["samples_generated"] == 0
    assert table(store) == rows


def test_every_sampling_parameter_is_sent_recorded_and_keyed(server, tmp_path):
    """vLLM fills unsent parameters from the model's generation_config: send them all, record them, key on them."""
    store = RunStore(tmp_path)
    run(recipe(server.base_url), store, GENERAL)
    assert server.log and all(e["extra"] == {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0} for e in server.log)
    assert all(e["seed"] is None for e in server.log)  # no seed by default: vLLM samples the batch at full speed
    rec = json.loads(table(store)[0]["sampling"])
    assert (rec["top_k"], rec["min_p"], rec["repetition_penalty"], rec["seed"]) == (-1, 0.0, 1.0, None)
    n = server.requests
    run(recipe(server.base_url, top_k=20, repetition_penalty=1.05), store, GENERAL)  # Qwen2.5's generation_config
    new = server.log[n:]
    assert new and server.requests == 2 * n  # a different sampling is a different request: not from the cache
    assert all(e["extra"] == {"top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05} for e in new)
    assert json.loads(table(store)[0]["sampling"])["top_k"] == 20


def test_send_seed_sends_and_records_the_seed(server, tmp_path):
    store = RunStore(tmp_path)
    run(recipe(server.base_url, send_seed=True, seed=5), store, GENERAL)
    assert all(isinstance(e["seed"], int) for e in server.log)
    assert json.loads(table(store)[0]["sampling"])["seed"] == 5
