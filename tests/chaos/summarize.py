"""Summarise a drill's results file (JSON lines, one row per trial) as the markdown tables of docs/reliability.md.

Usage: ``python tests/chaos/summarize.py runs/chaos/results.jsonl``
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def summarize(rows: list[dict]) -> str:
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
        hit = Counter(r["stage"] for r in kills)
        ok = sum(1 for r in kills if r.get("final_identical") and not r["broken_files"] and not r.get("leftover_temp_files"))
        out += ["", f"kills: {len(kills)}, passed: {ok}; stages hit: "
                + ", ".join(f"{k} {v}" for k, v in sorted(hit.items())), ""]
    for name in sorted(set(by) - {"kill"}):
        out.append(f"- {name}: {len(by[name])} trial(s): " + "; ".join(
            json.dumps({k: v for k, v in r.items() if k != "drill"}, sort_keys=True) for r in by[name]))
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/chaos/results.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(summarize(rows))


if __name__ == "__main__":
    main()
