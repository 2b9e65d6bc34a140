"""Summarise a drill's results file (JSON lines, one row per trial) as the markdown tables of docs/reliability.md.

Usage: ``python tests/chaos/summarize.py runs/chaos/results.jsonl``
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def _result(drill: str, r: dict) -> tuple[bool, str]:
    """(passed, one-line detail) of one non-kill trial row."""
    if drill == "llm_faults":
        return (r["reasked"] == 0, f"faults {r['faults']}; run 1: {r['requests_run1']} requests, class "
                f"{r['failing_class']} failed explicitly; re-run: {r['requests_run2']} requests, {r['reasked']} re-asked")
    if drill == "hostile_flow":
        return (r["exit_code"] == 0, f"{r['inputs']} hostile inputs, {r['in_shards']} decodable ones in the shards")
    if drill == "disk_full":
        return (r["resumed_ok"], f"{r['tars_before_failure']} tars written before ENOSPC kept intact; re-run "
                f"completed ({r['samples']} samples)")
    if drill == "secrets":
        return (r["hits"] == 0, f"{r['files_scanned']} files, {r['captured_logs']} captured logs, Prefect rows "
                f"{r['prefect_rows']}: {r['hits']} hits")
    if drill in ("broken_source", "malformed_recipe"):
        return (r["exit_code"] in (1, 2), f"{r['case']}: exit {r['exit_code']}")
    return (True, json.dumps(r, sort_keys=True))


def summarize(rows: list[dict]) -> str:
    """Markdown: one row per kill, then one row per scenario (trials, passed, details)."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["drill"]].append(r)
    out = []
    kills = by.get("kill", [])
    if kills:
        out += ["| chain | kill | target stage | stage hit | s after start | temp files at kill | broken files |"
                " shards identical | leftover temp | samples |", "|---|---:|---|---|---:|---:|---:|---|---:|---:|"]
        for r in kills:
            out.append(f"| {r['chain']} | {r['kill']} | {r['target']} | {r['stage']} | {r['seconds_after_start']} | "
                       f"{r['temp_files_after_kill']} | {len(r['broken_files'])} | {r.get('final_identical')} | "
                       f"{r.get('leftover_temp_files')} | {r.get('samples')} |")
        out.append("")
    out += ["| scenario | trials | passed | details |", "|---|---:|---:|---|"]
    if kills:
        ok = sum(1 for r in kills if r.get("final_identical") and not r["broken_files"] and not r.get("leftover_temp_files"))
        hit = Counter(r["stage"] for r in kills)
        out.append(f"| kill -9 + resume | {len(kills)} | {ok} | stages hit: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(hit.items())) + " |")
    for name in sorted(set(by) - {"kill"}):
        results = [_result(name, r) for r in by[name]]
        details = "; ".join(d for _, d in results) if len(results) <= 3 else \
            f"{len(results)} cases: " + ", ".join(d for _, d in results)
        out.append(f"| {name} | {len(results)} | {sum(ok for ok, _ in results)} | {details} |")
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/chaos/results.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(summarize(rows))


if __name__ == "__main__":
    main()
