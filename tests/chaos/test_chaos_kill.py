"""Kill -9 the whole build at random points of every stage, re-run, and compare with an uninterrupted run.

A chain: the build is started, killed (SIGKILL to its process group) at a random moment inside a
target stage, started again on the same folder, killed again further on, ... and finally run to
the end. After every kill each file in place must be whole (atomic writes); after the last run
the shards must be byte-identical to the reference run, with no duplicate and no missing sample,
the run store's tables must agree with the shards, and no temp file may be left behind.

The default run kills 3 times (3 random stages); ``make chaos`` runs 2 chains of 5 kills (10 in all,
every stage hit at least once). ``ALIVE_CHAOS_SEED`` replays a drill; ``ALIVE_CHAOS_RESULTS`` names a
JSON-lines file that gets one row per kill.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from chaos_harness import (DRILL_STAGES, STAGES, build_env, check_run, observe_stage, readable_everywhere, record,
                           results_path, run_build, shard_bytes, start_build, temp_files, wait_for_stage)

pytestmark = pytest.mark.chaos

SLOW_WRITE = 0.15  # seconds each atomic write of the flow process waits before its rename
# How long after a stage starts a kill may land (seconds, drawn uniformly): about the stage's length here.
WINDOW = {"ingest": 4.0, "describe": 2.5, "pair": 0.5, "score": 5.0, "filter": 0.4, "mix": 0.6, "write": 4.0,
          "report": 1.5}


def _seed() -> int:
    return int(os.environ.get("ALIVE_CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))


def kill_chain(reference: dict, api_url: str, targets: list[str], name: str, seed: int) -> list[dict]:
    """Kill the build once per target stage (in pipeline order), then finish it; returns one row per kill."""
    rng = random.Random(f"{seed}/{name}")
    tmp = reference["tmp"]
    out = tmp / name
    log = tmp / "logs" / f"{name}.log"
    rows = []
    for i, target in enumerate(sorted(targets, key=STAGES.index)):
        b = start_build(reference["recipe"], out, build_env(api_url, SLOW_WRITE), log)
        reached = wait_for_stage(b, out, reference["exp"], target)
        assert b.proc.poll() is None, f"{name}: the build ended (rc {b.proc.returncode}) before the {target} kill:\n" \
                                      f"{b.output()[-3000:]}"
        time.sleep(rng.uniform(0, WINDOW[target]))
        stage = observe_stage(out, reference["exp"])
        at = time.monotonic() - b.started
        b.kill()
        broken = readable_everywhere(out)
        row = {"drill": "kill", "chain": name, "seed": seed, "kill": i + 1, "target": target, "reached": reached,
               "stage": stage, "seconds_after_start": round(at, 2), "temp_files_after_kill": len(temp_files(out)),
               "broken_files": broken}
        rows.append(row)
        assert not broken, f"{name} kill {i + 1} ({stage}): files left half-written: {broken[:5]} (seed {seed})"
    t0 = time.monotonic()
    run_build(reference["recipe"], out, build_env(api_url), log)
    resume_s = time.monotonic() - t0
    leftovers = temp_files(out)
    got = shard_bytes(out)
    same = got == reference["shards"]
    counts = check_run(out)
    for r in rows:
        r.update(final_identical=same, leftover_temp_files=len(leftovers), resume_seconds=round(resume_s, 1), **counts)
        record(results_path(), r)
    assert not leftovers, f"{name}: interrupted writes left temp files: {leftovers[:5]} (seed {seed})"
    differ = sorted(k for k in set(got) | set(reference["shards"]) if got.get(k) != reference["shards"].get(k))
    assert same, f"{name}: shards differ from the uninterrupted run: {differ[:10]} (seed {seed}, kills {rows})"
    assert counts == check_run(reference["out"])
    return rows


@pytest.mark.timeout(1800)
def test_kill_three_random_stages_then_resume_is_byte_identical(reference, api_url, llm):
    """CI version: one chain, 3 kills in 3 distinct random stages."""
    seed = _seed()
    targets = random.Random(seed).sample(DRILL_STAGES, 3)
    rows = kill_chain(reference, api_url, targets, "ci-chain", seed)
    assert len(rows) == 3


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill_ten_points_over_every_stage(reference, api_url, llm):
    """Full drill: 10 kills in 2 chains of 5; every stage is a target at least once."""
    seed = _seed()
    rng = random.Random(seed)
    targets = list(DRILL_STAGES) + rng.choices(DRILL_STAGES, k=10 - len(DRILL_STAGES))
    rng.shuffle(targets)
    rows = kill_chain(reference, api_url, targets[:5], "chain-a", seed)
    rows += kill_chain(reference, api_url, targets[5:], "chain-b", seed)
    assert len(rows) == 10
    hit = {r["stage"] for r in rows}
    # a kill lands where the run is when the drawn delay ends; most land in their target stage
    assert sum(r["stage"] == r["target"] for r in rows) >= 6, rows
    assert len(hit & set(DRILL_STAGES)) >= 5, f"kills landed in {sorted(hit)} only (seed {seed})"
