"""StageStats: counters that add up across shards (total / kept / dropped_<reason>, timing)."""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class StageStats:
    stage: str
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)  # free-form extras (requests, cache_hits, tokens_out...)
    # Levels, not counts (tokens_per_s, cache_hit_rate, feasible): merging keeps the later unit's value.
    gauges: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    examples: dict[str, str] = field(default_factory=dict)  # first message seen per drop reason

    def drop(self, reason: str, n: int = 1, example: str | None = None) -> None:
        self.dropped[reason] += n
        if example is not None and reason not in self.examples:
            self.examples[reason] = example[:500]

    def add(self, name: str, value: float = 1) -> None:
        self.counters[name] += value

    def gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    @contextmanager
    def timer(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: "StageStats") -> "StageStats":
        out = StageStats(self.stage)
        out.total = self.total + other.total
        out.kept = self.kept + other.kept
        out.dropped = self.dropped + other.dropped
        out.counters = Counter(self.counters)
        out.counters.update(other.counters)
        out.gauges = {**self.gauges, **other.gauges}
        out.seconds = self.seconds + other.seconds
        out.examples = {**other.examples, **self.examples}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "total": self.total,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "counters": dict(sorted(self.counters.items())),
            "gauges": dict(sorted(self.gauges.items())),
            "seconds": round(self.seconds, 4),
            "examples": dict(sorted(self.examples.items())),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageStats":
        return cls(
            stage=d["stage"],
            total=d.get("total", 0),
            kept=d.get("kept", 0),
            dropped=Counter(d.get("dropped", {})),
            counters=Counter(d.get("counters", {})),
            gauges=dict(d.get("gauges", {})),
            seconds=d.get("seconds", 0.0),
            examples=dict(d.get("examples", {})),
        )

    def summary_rows(self) -> list[dict[str, Any]]:
        """Rows for a table artifact / CLI table."""
        rows = [{"stage": self.stage, "metric": "total", "value": self.total},
                {"stage": self.stage, "metric": "kept", "value": self.kept}]
        rows += [{"stage": self.stage, "metric": f"dropped_{k}", "value": v} for k, v in sorted(self.dropped.items())]
        rows += [{"stage": self.stage, "metric": k, "value": v} for k, v in sorted(self.counters.items())]
        rows += [{"stage": self.stage, "metric": k, "value": v} for k, v in sorted(self.gauges.items())]
        rows.append({"stage": self.stage, "metric": "seconds", "value": round(self.seconds, 2)})
        return rows


def merge_all(stage: str, stats: list[StageStats]) -> StageStats:
    out = StageStats(stage)
    for s in stats:
        out = out.merge(s)
    return out


def load_stage_stats(stats_dir: Path, stage: str) -> StageStats:
    """Sum every ``stats/<stage>/**/*.json`` file of a run."""
    out = StageStats(stage)
    d = stats_dir / stage
    if d.exists():
        for p in sorted(d.rglob("*.json")):
            out = out.merge(StageStats.from_dict(json.loads(p.read_text())))
    return out
