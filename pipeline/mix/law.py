"""Data mixing law: ``metric(r) = c + k * exp(t * r)`` per eval domain, r = the general share.

Following Data Mixing Laws (Ye et al.), a few small runs at different general shares give
(share, metric) points per eval domain; each domain's curve is fitted with a Huber loss by L-BFGS-B
from several starts (for a fixed ``t`` the law is linear in ``c`` and ``k``, so every start is the
least-squares ``c, k`` of one ``t`` on a grid). The fitted curves then pick a share by a stated rule:

- ``min-general``: the smallest share whose predicted general-domain metric is within ``tolerance``
  of the base (the base model's value when given, else the prediction at the largest share tried);
  the continual-pretraining use of the paper.
- ``weighted``: the share maximising the weighted sum of the predicted metrics (every domain weight
  1 unless told).

Results CSV: one row per run. Wide (``general_share, crops, livestock, general``: one column per
eval domain) or long (``general_share, domain, metric``). Optional ``base_<domain>`` columns hold
the base model's value of that domain (used as the ``min-general`` base).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

SHARE_COLUMNS = ("general_share", "share", "r")
T_BOUND = 30.0  # |t| beyond this is a step function on r in [0, 1]: nothing a handful of runs can tell
RULES = ("min-general", "weighted")


class ResultsError(ValueError):
    """A results CSV that cannot be fitted; the message names the file, the row and the fix."""


@dataclass
class Results:
    """Points per eval domain and the base model's values, read from a results CSV."""

    points: dict[str, tuple[np.ndarray, np.ndarray]]  # domain -> (shares, metrics)
    base: dict[str, float]  # domain -> base model's metric (mean of base_<domain> cells)


@dataclass
class LawFit:
    """One domain's fitted law and how well it fits."""

    domain: str
    c: float
    k: float
    t: float
    n: int
    rmse: float
    max_abs_error: float
    huber_loss: float
    delta: float
    stderr_c: float
    stderr_k: float
    stderr_t: float

    def predict(self, r: np.ndarray | float) -> np.ndarray:
        return law(np.asarray(r, dtype=np.float64), self.c, self.k, self.t)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def law(r: np.ndarray, c: float, k: float, t: float) -> np.ndarray:
    """``c + k * exp(t * r)``."""
    return c + k * np.exp(t * r)


def _huber(res: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Huber loss (mean) and its derivative with respect to each residual."""
    a = np.abs(res)
    quad = a <= delta
    loss = np.where(quad, 0.5 * res**2, delta * (a - 0.5 * delta))
    grad = np.where(quad, res, delta * np.sign(res))
    return float(loss.mean()), grad / len(res)


def _objective(p: np.ndarray, r: np.ndarray, y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    c, k, t = p
    e = np.exp(t * r)
    res = c + k * e - y
    loss, g = _huber(res, delta)
    return loss, np.array([g.sum(), (g * e).sum(), (g * k * r * e).sum()])


def _linear_ck(r: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    """Least-squares ``c, k`` for a fixed ``t``."""
    a = np.column_stack([np.ones_like(r), np.exp(t * r)])
    (c, k), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(c), float(k)


def default_delta(y: np.ndarray) -> float:
    """Huber threshold: 5% of the metric's spread (a residual beyond it counts linearly)."""
    spread = float(np.ptp(y))
    return max(0.05 * spread, 1e-6 * max(1.0, float(np.abs(y).max())), 1e-12)


@contextlib.contextmanager
def _single_blas_thread() -> Iterator[None]:
    """One BLAS thread while fitting: L-BFGS-B makes thousands of tiny BLAS calls, and waking a
    thread pool for each one costs far more than the call (10x slower on a busy machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the fit is the same, only slower
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _start_ts(r: np.ndarray, y: np.ndarray, n_starts: int) -> list[float]:
    """Starting ``t`` values: the best local minima of the least-squares residual over a ``t`` grid."""
    grid = np.linspace(-T_BOUND, T_BOUND, 241)
    ssr = np.empty(len(grid))
    for i, t in enumerate(grid):
        c, k = _linear_ck(r, y, t)
        res = c + k * np.exp(t * r) - y
        ssr[i] = res @ res
    padded = np.concatenate(([np.inf], ssr, [np.inf]))
    minima = np.flatnonzero((padded[1:-1] <= padded[:-2]) & (padded[1:-1] <= padded[2:]))
    order = minima[np.argsort(ssr[minima], kind="stable")]
    picks = [float(grid[i]) for i in order[:n_starts]]
    for t in (-3.0, 3.0):  # always try a moderate decay and growth too
        if len(picks) < n_starts + 2 and all(abs(t - p) > 0.5 for p in picks):
            picks.append(t)
    return picks


def fit_law(r: Sequence[float], y: Sequence[float], domain: str = "metric", delta: Optional[float] = None,
            n_starts: int = 3) -> LawFit:
    """Fit ``y = c + k * exp(t * r)`` with a Huber loss, L-BFGS-B from several starts.

    The metric is standardised first (median 0, spread 1) so tolerances mean the same for accuracies
    and losses. For a fixed ``t`` the law is linear in ``c, k``: starts are the best local minima of
    the least-squares residual over a ``t`` grid, each with its least-squares ``c, k``.

    Args:
        r: General shares in [0, 1], at least 3 distinct values.
        y: The metric at each share.
        domain: Name carried into the result.
        delta: Huber threshold in metric units; default :func:`default_delta`.
        n_starts: Starts taken from the grid (two moderate ones are added).

    Returns:
        The best fit of all starts, with RMSE, largest error and approximate standard errors
        (Gauss-Newton; NaN with 3 points, where the fit is exact).
    """
    from scipy.optimize import minimize

    r = np.asarray(r, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(r) != len(y):
        raise ValueError(f"{domain}: {len(r)} shares but {len(y)} metrics")
    if len(np.unique(r)) < 3:
        raise ValueError(f"{domain}: the law has 3 parameters; it needs runs at 3 or more distinct shares, "
                         f"got {sorted(set(r.tolist()))}")
    d = default_delta(y) if delta is None else float(delta)
    mid = float(np.median(y))
    scale = float(np.ptp(y)) or 1.0
    ys = (y - mid) / scale
    bounds = [(None, None), (None, None), (-T_BOUND, T_BOUND)]
    args = (r, ys, d / scale)

    def run(x0: np.ndarray, maxiter: int) -> Any:
        return minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                        options={"maxiter": maxiter, "ftol": 1e-12, "gtol": 1e-9})

    # A short run from every start, then the best one polished to convergence: starts in the wrong
    # basin drift towards t -> 0 with huge c, k and would otherwise take hundreds of iterations.
    with _single_blas_thread():
        tries = [run(np.array([*_linear_ck(r, ys, t0), t0]), 30) for t0 in _start_ts(r, ys, n_starts)]
        best = min(tries, key=lambda res: res.fun)
        if not best.success:
            polished = run(best.x, 1000)
            best = polished if polished.fun <= best.fun else best
    cs, ks, t = (float(v) for v in best.x)
    c, k = mid + scale * cs, scale * ks
    resid = law(r, c, k, t) - y
    n = len(r)
    se = (math.nan,) * 3
    if n > 3:
        e = np.exp(t * r)
        jac = np.column_stack([np.ones_like(r), e, k * r * e])
        s2 = float(resid @ resid) / (n - 3)
        try:
            cov = s2 * np.linalg.inv(jac.T @ jac)
            se = tuple(float(math.sqrt(v)) if v >= 0 else math.nan for v in np.diag(cov))
        except np.linalg.LinAlgError:
            pass
    return LawFit(domain, c, k, t, n, float(math.sqrt(np.mean(resid**2))), float(np.abs(resid).max()),
                  float(best.fun) * scale**2, d, *se)


# ----------------------------------------------------------------------------------------------
# results CSV
# ----------------------------------------------------------------------------------------------


def _num(cell: str, path: Path, line: int, col: str) -> Optional[float]:
    cell = (cell or "").strip()
    if cell == "" or cell.lower() in ("nan", "na", "none", "-"):
        return None
    try:
        v = float(cell)
    except ValueError:
        raise ResultsError(f"{path}:{line}: column {col!r} has {cell!r}, not a number") from None
    if not math.isfinite(v):
        return None
    return v



def _add_value(name: str, v: Optional[float], share: float, base: dict, pts: dict) -> None:
    """One metric value of a results row: a base-model reference ('base_<domain>') or a (share, value) point."""
    if v is None:
        return
    if name.startswith("base_"):
        base.setdefault(name.removeprefix("base_"), []).append(v)
    else:
        pts.setdefault(name, []).append((share, v))

def read_results(path: str | Path) -> Results:
    """Read a results CSV (wide or long, see the module docstring).

    Raises:
        ResultsError: missing file or share column, a non-numeric cell, a share outside [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: results file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    share_col = next((c for c in SHARE_COLUMNS if c in header), None)
    if share_col is None:
        raise ResultsError(f"{path}: no share column; name one of {list(SHARE_COLUMNS)} "
                           f"(the general share of each run, 0..1), got columns {header}")
    long = "domain" in header and ("metric" in header or "value" in header)
    value_col = "metric" if "metric" in header else "value"
    pts: dict[str, list[tuple[float, float]]] = {}
    base: dict[str, list[float]] = {}
    for i, row in enumerate(rows, start=2):
        r = _num(row.get(share_col, ""), path, i, share_col)
        if r is None:
            raise ResultsError(f"{path}:{i}: empty {share_col!r}; every run needs its general share")
        if not 0 <= r <= 1:
            hint = " (it looks like a percentage: write fractions, e.g. 0.23)" if 1 < r <= 100 else ""
            raise ResultsError(f"{path}:{i}: {share_col}={r} is outside [0, 1]{hint}")
        if long:
            dom = (row.get("domain") or "").strip()
            if not dom:
                raise ResultsError(f"{path}:{i}: empty 'domain'")
            _add_value(dom, _num(row.get(value_col, ""), path, i, value_col), r, base, pts)
            continue
        for col in header:
            if col == share_col or col.startswith("realised_") or col in ("run", "note", "notes"):
                continue
            _add_value(col, _num(row.get(col, ""), path, i, col), r, base, pts)
    if not pts:
        raise ResultsError(f"{path}: no metric values; add one column per eval domain (wide) or "
                           "domain + metric columns (long)")
    points = {d: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for d, v in sorted(pts.items())}
    return Results(points, {d: float(np.mean(v)) for d, v in sorted(base.items()) if v})


def fit_all(results: Results, delta: Optional[float] = None) -> dict[str, LawFit]:
    """One fit per domain; domains with fewer than 3 distinct shares are skipped with a warning."""
    fits = {}
    for dom, (r, y) in results.points.items():
        try:
            fits[dom] = fit_law(r, y, dom, delta)
        except ValueError as e:
            log.warning("mixing law: %s", e)
    if not fits:
        raise ResultsError("no domain has runs at 3 or more distinct shares: nothing to fit")
    return fits


# ----------------------------------------------------------------------------------------------
# recommendation
# ----------------------------------------------------------------------------------------------


def recommend(fits: dict[str, LawFit], rule: str = "min-general", *, general_domain: str = "general",
              tolerance: float = 0.01, base: Optional[float] = None, weights: Optional[dict[str, float]] = None,
              higher_is_better: bool = True, observed: Optional[tuple[float, float]] = None,
              grid_points: int = 1001) -> dict[str, Any]:
    """Pick a general share from the fitted laws.

    Args:
        fits: Fitted law per eval domain.
        rule: ``min-general`` or ``weighted`` (see the module docstring).
        general_domain: The eval domain that measures general ability (``min-general``).
        tolerance: How far the general metric may fall from the base (metric units).
        base: The base model's general metric; default the prediction at the largest share tried.
        weights: Domain -> weight for ``weighted`` (default 1 each; unlisted domains 0 when given).
        higher_is_better: Accuracy-like metrics (True) or loss-like (False).
        observed: (min, max) share that was run; default the range of the fits' data is unknown,
            so the whole [0, 1] counts as observed.
        grid_points: Shares tried on [0, 1].

    Returns:
        ``{"rule", "share" (None when no share satisfies the rule), "predicted" {domain: value},
        "reason", "extrapolated", ...}``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {list(RULES)}")
    grid = np.linspace(0.0, 1.0, grid_points)
    sign = 1.0 if higher_is_better else -1.0
    lo, hi = observed if observed is not None else (0.0, 1.0)
    out: dict[str, Any] = {"rule": rule, "higher_is_better": higher_is_better}
    if rule == "min-general":
        if general_domain not in fits:
            raise ValueError(f"rule min-general needs a fitted {general_domain!r} domain (have {sorted(fits)}); "
                             "add a general eval domain to the results or use --rule weighted")
        g = fits[general_domain]
        base_value = float(g.predict(hi)) if base is None else float(base)
        pred = g.predict(grid)
        ok = (pred >= base_value - tolerance) if higher_is_better else (pred <= base_value + tolerance)
        out.update({"general_domain": general_domain, "tolerance": tolerance, "base": base_value,
                    "base_from": "given" if base is not None else f"prediction at the largest share tried ({hi:g})"})
        if not ok.any():
            best = grid[int(np.argmax(sign * pred))]
            out.update({"share": None, "predicted": {d: float(f.predict(best)) for d, f in fits.items()},
                        "reason": f"no share in [0, 1] keeps {general_domain} within {tolerance:g} of "
                                  f"{base_value:.4g}; the best predicted {general_domain} value is {float(g.predict(best)):.4g} "
                                  f"at share {best:.3f}",
                        "extrapolated": False})
            return out
        share = float(grid[int(np.argmax(ok))])
        reason = (f"smallest general share whose predicted {general_domain} metric "
                  f"({float(g.predict(share)):.4g}) is within {tolerance:g} of the base ({base_value:.4g})")
    else:
        w = {d: 1.0 for d in fits} if not weights else {d: float(weights.get(d, 0.0)) for d in fits}
        unknown = sorted(set(weights or {}) - set(fits))
        if unknown:
            raise ValueError(f"weights name domains with no fit: {unknown} (fitted: {sorted(fits)})")
        score = sum(w[d] * sign * fits[d].predict(grid) for d in fits)
        share = float(grid[int(np.argmax(score))])
        out.update({"weights": w, "score": float(np.max(score))})
        reason = "share maximising " + " + ".join(f"{w[d]:g}*{d}" for d in fits if w[d]) + \
                 ("" if higher_is_better else " (negated: lower is better)")
    out.update({"share": share, "predicted": {d: float(f.predict(share)) for d, f in fits.items()},
                "reason": reason, "extrapolated": bool(share < lo - 1e-9 or share > hi + 1e-9)})
    return out


# ----------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------


def plot(results: Results, fits: dict[str, LawFit], rec: Optional[dict[str, Any]], dest: str | Path) -> Path:
    """PNG of the points and fitted curves per domain, with the recommended share marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..store import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    grid = np.linspace(0, 1, 401)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (dom, (r, y)) in enumerate(results.points.items()):
        col = colors[i % len(colors)]
        ax.scatter(r, y, color=col, s=22, zorder=3)
        if dom in fits:
            f = fits[dom]
            ax.plot(grid, f.predict(grid), color=col,
                    label=f"{dom}: {f.c:.3g} {'+' if f.k >= 0 else '-'} {abs(f.k):.3g}·exp({f.t:.3g} r)  "
                          f"(rmse {f.rmse:.2g})")
        else:
            ax.plot([], [], color=col, label=f"{dom}: not fitted")
        if dom in results.base:
            ax.axhline(results.base[dom], color=col, lw=0.8, ls=":")
    if rec and rec.get("share") is not None:
        ax.axvline(rec["share"], color="k", ls="--", lw=1)
        ax.annotate(f"{rec['rule']}: r = {rec['share']:.3f}", (rec["share"], 0.02), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", fontsize=8)
    all_r = np.concatenate([r for r, _ in results.points.values()])
    all_y = np.concatenate([y for _, y in results.points.values()] + [np.array(list(results.base.values()))])
    lo, hi = float(all_y.min()), float(all_y.max())
    pad = 0.35 * (hi - lo) or 0.05 * max(abs(hi), 1e-3)
    ax.set_ylim(lo - pad, hi + pad)  # extrapolated curves may run far off: keep the data readable
    for a, b in ((0.0, float(all_r.min())), (float(all_r.max()), 1.0)):
        if b > a:
            ax.axvspan(a, b, color="0.93", zorder=0)
    ax.set_xlabel("general share r (shaded: outside the shares tried)")
    ax.set_ylabel("metric")
    ax.set_xlim(0, 1)
    ax.set_title("Data mixing law fit: metric(r) = c + k·exp(t·r)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return dest
