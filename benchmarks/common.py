"""Shared machinery of the benchmarks: paired rounds, machine record, raw results, the summary line.

Every benchmark alternates ours and the baseline in paired rounds (who goes first flips each round,
so drift in machine load hits both sides alike), records the 1-minute load average before and after
every side, and writes everything it measured to ``benchmarks/results/<name>.json``. Its last
stdout line is the summary: benchmark, ours, baseline, unit, speedup (ours/baseline, >1 better).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load1() -> float:
    """1-minute load average (other work on the machine shows up here)."""
    return round(os.getloadavg()[0], 2)


def cpu_flags() -> list[str]:
    """The CPU flags that decide which kernels run (SIMD width, bf16 matrix units)."""
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": cpu_flags(), "memory_gb": mem,
            "python": platform.python_version(), "platform": platform.platform(), "load_at_start": load1()}


def versions(*packages: str) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def timed(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run one side once: wall seconds, load before/after and whatever dict ``fn`` returns."""
    before = load1()
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    out = {"seconds": dt, **(res if isinstance(res, dict) else {})}
    if "seconds" in (res or {}):  # a side may time only its own part (input loading excluded)
        out["seconds"] = res["seconds"]
        out["wall_seconds"] = dt
    out["load_before"], out["load_after"] = before, load1()
    return out


def paired_rounds(rounds: int, sides: dict[str, Callable[[], Any]], log: Optional[Callable[[int, dict], None]] = None
                  ) -> list[dict[str, dict]]:
    """``rounds`` rounds of every side back to back; the order rotates each round.

    Returns one dict per round: side name -> its :func:`timed` record (plus ``order`` run first to last).
    """
    names = list(sides)
    out: list[dict[str, dict]] = []
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        rec: dict[str, Any] = {}
        for name in order:
            rec[name] = timed(sides[name])
        rec["order"] = order
        out.append(rec)
        if log is not None:
            log(r, rec)
    return out


def load_range(rounds: Sequence[dict], sides: Sequence[str]) -> dict[str, float]:
    """Lowest and highest 1-minute load seen around any timed side of any round."""
    vals = [r[s][k] for r in rounds for s in sides for k in ("load_before", "load_after")]
    return {"min": min(vals), "max": max(vals)}


def stats(values: Sequence[float], higher_is_better: bool = True) -> dict[str, float]:
    """Mean, median and worst of per-round values."""
    vals = list(values)
    worst = min(vals) if higher_is_better else max(vals)
    return {"mean": statistics.fmean(vals), "median": statistics.median(vals), "worst": worst}


def rounded(x: Any, nd: int = 5) -> Any:
    """Floats to ``nd`` significant digits (small errors stay visible), recursively."""
    if isinstance(x, float):
        return float(f"{x:.{nd}g}")
    if isinstance(x, dict):
        return {k: rounded(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, nd) for v in x]
    return x


def finish(name: str, summary: dict[str, Any], rounds: list, params: dict[str, Any], packages: Sequence[str],
           results: Optional[Path] = None, extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the raw results and print the summary as the last stdout line.

    ``summary`` must hold ours, baseline, unit and speedup; ``benchmark`` is added here.
    """
    summary = {"benchmark": name, **summary}
    for key in ("ours", "baseline", "unit", "speedup"):
        assert key in summary, f"summary lacks {key}"
    path = Path(results) if results is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(),
           "versions": versions(*packages), "params": params, "summary": rounded(summary),
           "rounds": rounded(rounds), **(rounded(extra) if extra else {})}
    doc["machine"]["load_at_end"] = load1()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    print(json.dumps(rounded(summary)), flush=True)
    return path


def run_cmd(cmd: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> dict[str, Any]:
    """A whole process: wall seconds, its CPU seconds and peak RSS (from wait4), and its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}):\n{out[-4000:]}")
    return {"seconds": dt, "output": out, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}
