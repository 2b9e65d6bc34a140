"""The mix report (``mix/mix_report.json``) and its table (CLI and Prefect artifact)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..recipe import MixConfig
from .mixer import UNLABELED, MixResult, capped_classes

REPORT_VERSION = 1


def build_report(result: MixResult, cfg: MixConfig, seed: int) -> dict[str, Any]:
    """Target vs realised share per bucket, counts per class before/after, unmet targets.

    Realised numbers are those of the plan, which the drawn repeats match exactly (a test checks
    the manifest against them).
    """
    pool, pl = result.pool, result.plan
    n = pool.class_size
    rows = pl.class_rows
    unique = np.minimum(rows, n)
    reps_used = -(-rows // np.maximum(n, 1))
    capped = capped_classes(pool, pl, cfg)
    nb = len(pool.bucket_names)
    b_pool = np.bincount(pool.class_bucket, weights=n, minlength=nb).round().astype(np.int64)
    b_unique = np.bincount(pool.class_bucket, weights=unique, minlength=nb).round().astype(np.int64)
    b_classes = np.bincount(pool.class_bucket, weights=~pool.unlabeled, minlength=nb).astype(np.int64)
    b_capped = np.bincount(pool.class_bucket, weights=capped, minlength=nb).astype(np.int64)
    b_reps = np.zeros(nb, np.int64)
    if len(rows):
        np.maximum.at(b_reps, pool.class_bucket, reps_used)
    total = int(pl.total)
    w_sum = np.bincount(pool.class_bucket, weights=pl.class_weight, minlength=nb)

    buckets = []
    for b, name in enumerate(pool.bucket_names):
        realised = float(pl.bucket_rows[b] / total) if total else 0.0
        target = float(pl.shares[b])
        buckets.append({
            "bucket": name,
            "domain": pool.bucket_domain[b],
            "target_share": target,
            "realised_share": realised,
            "share_error_pt": (realised - target) * 100.0,
            "target_rows": float(target * pl.requested_total),
            "rows": int(pl.bucket_rows[b]),
            "unique": int(b_unique[b]),
            "pool": int(b_pool[b]),
            "classes": int(b_classes[b]),
            "capped_classes": int(b_capped[b]),
            "capacity_once": int(pl.bucket_cap1[b]),
            "capacity": int(pl.bucket_cap[b]),
            "max_repeats_used": int(b_reps[b]),
        })
    classes = []
    for i, cname in enumerate(pool.class_names):
        b = int(pool.class_bucket[i])
        brow = int(pl.bucket_rows[b])
        classes.append({
            "bucket": pool.bucket_names[b],
            "class_name": UNLABELED if cname is None else cname,
            "labeled": cname is not None,
            "before": int(n[i]),
            "after": int(rows[i]),
            "unique": int(unique[i]),
            "capped": bool(capped[i]),
            "max_repeats_used": int(reps_used[i]),
            "target_share_in_bucket": float(pl.class_weight[i] / w_sum[b]) if w_sum[b] else 0.0,
            "realised_share_in_bucket": float(rows[i] / brow) if brow else 0.0,
        })
    mixed = [x for x in buckets if x["target_share"] > 0 or x["rows"] > 0]
    not_mixed = {x["bucket"]: x["pool"] for x in buckets if x["target_share"] <= 0 and x["pool"] > 0}
    applied = pl.closest.get("applied", "requested") if not pl.feasible else "requested"
    return {
        "version": REPORT_VERSION,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "input_rows": int(pool.n_rows),
        "requested_total": int(pl.requested_total),
        "total": total,
        "unique_samples": int(unique.sum()),
        "feasible": bool(pl.feasible),
        "on_infeasible": cfg.on_infeasible,
        "applied": applied,
        "max_share_error_pt": max((abs(x["share_error_pt"]) for x in mixed), default=0.0),
        "buckets": buckets,
        "classes": classes,
        "unmet": pl.unmet,
        "closest_feasible": {k: v for k, v in pl.closest.items() if k != "applied"},
        "not_mixed": not_mixed,
    }


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per bucket: target vs realised share (percent), rows, and whether it was met.

    Suitable for ``prefect.artifacts.create_table_artifact(table=...)`` and :func:`format_table`.
    """
    short = {u["bucket"] for u in report.get("unmet", []) if u.get("constraint") == "share"}
    out = []
    for b in report["buckets"]:
        if b["bucket"] in short:
            status = "short"
        elif b["target_share"] <= 0:
            status = "not mixed" if b["pool"] else "empty"
        else:
            status = "ok"
        out.append({
            "bucket": b["bucket"],
            "target_%": round(100 * b["target_share"], 4),
            "realised_%": round(100 * b["realised_share"], 4),
            "error_pt": round(b["share_error_pt"], 4),
            "rows": b["rows"],
            "unique": b["unique"],
            "pool": b["pool"],
            "capped_classes": b["capped_classes"],
            "max_repeats": b["max_repeats_used"],
            "status": status,
        })
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`table_rows` (for the CLI)."""
    if not rows:
        return "(no buckets)"
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, width)))

    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(x) for x in cells])


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines: totals and every unmet target with its reason and the closest mixes."""
    lines = [f"mix: {report['total']} rows ({report['unique_samples']} unique samples) from "
             f"{report['input_rows']} in the pool; requested {report['requested_total']}; "
             f"max share error {report['max_share_error_pt']:.4f} pt"]
    for u in report["unmet"]:
        lines.append(f"  unmet {u['constraint']}: {u['reason']}")
    if report["unmet"]:
        cf = report["closest_feasible"]
        lines.append(f"  closest with the same shares: total {cf['same_shares']['total']}")
        st = ", ".join(f"{k} {v:.2%}" for k, v in cf["same_total"]["shares"].items())
        lines.append(f"  closest with the same total: {cf['same_total']['total']} rows ({st})")
        lines.append(f"  applied: {report['applied']} (on_infeasible: {report['on_infeasible']})")
    return lines
