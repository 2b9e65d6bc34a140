"""``alive mixing-law``: fit data-mixing laws on small-run results and pick a general share.

Mounted by the main CLI as ``app.add_typer(pipeline.mix.cli.app, name="mixing-law")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from . import law

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fit metric(r) = c + k*exp(t*r) per eval domain and recommend a general share r.")


def _weights(items: list[str]) -> Optional[dict[str, float]]:
    if not items:
        return None
    out = {}
    for it in items:
        if "=" not in it:
            raise typer.BadParameter(f"--weight expects DOMAIN=W, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise typer.BadParameter(f"--weight {it!r}: {v!r} is not a number") from None
    return out


def _fmt(x: Optional[float]) -> str:
    return "nan" if x is None or x != x else f"{x:.4g}"


def fit_and_report(results_path: Path, rule: str, general_domain: str, tolerance: float, base: Optional[float],
                   weights: Optional[dict[str, float]], higher_is_better: bool, delta: Optional[float],
                   png: Optional[Path], json_out: Optional[Path]) -> dict[str, Any]:
    """Fit every domain of a results CSV, print the parameters and the recommendation, save PNG + JSON."""
    res = law.read_results(results_path)
    fits = law.fit_all(res, delta)
    all_r = [float(v) for r, _ in res.points.values() for v in r]
    base_from = None
    if base is None and rule == "min-general" and general_domain in res.base:
        base = res.base[general_domain]
        base_from = f"base_{general_domain} column of {results_path.name}"
    rec = law.recommend(fits, rule, general_domain=general_domain, tolerance=tolerance, base=base,
                        weights=weights, higher_is_better=higher_is_better, observed=(min(all_r), max(all_r)))
    if base_from is not None:
        rec["base_from"] = base_from

    typer.echo(f"{'domain':<14}{'n':>3}  {'c':>10} {'± se':>9}  {'k':>10} {'± se':>9}  {'t':>8} {'± se':>8}"
               f"  {'rmse':>9} {'max err':>9}")
    for d, f in fits.items():
        typer.echo(f"{d:<14}{f.n:>3}  {f.c:>10.4g} {_fmt(f.stderr_c):>9}  {f.k:>10.4g} {_fmt(f.stderr_k):>9}  "
                   f"{f.t:>8.4g} {_fmt(f.stderr_t):>8}  {f.rmse:>9.3g} {f.max_abs_error:>9.3g}")
    skipped = sorted(set(res.points) - set(fits))
    if skipped:
        typer.echo(f"not fitted (fewer than 3 distinct shares): {', '.join(skipped)}")
    if rec["share"] is None:
        typer.echo(f"recommendation ({rule}): none. {rec['reason']}")
    else:
        pred = ", ".join(f"{d} {v:.4g}" for d, v in rec["predicted"].items())
        extra = "  [outside the shares tried: extrapolated]" if rec["extrapolated"] else ""
        typer.echo(f"recommended general share ({rule}): {rec['share']:.3f}{extra}")
        typer.echo(f"  rule: {rec['reason']}")
        typer.echo(f"  predicted: {pred}")
    png = png or results_path.with_suffix(".png")
    law.plot(res, fits, rec, png)
    typer.echo(f"plot: {png}")
    doc = {"results": str(results_path), "fits": {d: f.to_dict() for d, f in fits.items()}, "recommendation": rec}
    if json_out is not None:
        from ..store import write_json_atomic

        write_json_atomic(json_out, doc)
        typer.echo(f"fit: {json_out}")
    return doc


@app.command("fit")
def fit_cmd(
    results: Path = typer.Argument(..., help="CSV: general_share + one metric column per eval domain "
                                             "(or general_share, domain, metric); optional base_<domain>."),
    rule: str = typer.Option("min-general", help="min-general | weighted"),
    general_domain: str = typer.Option("general", help="Eval domain measuring general ability."),
    tolerance: float = typer.Option(0.01, help="min-general: allowed drop of the general metric from the base."),
    base: Optional[float] = typer.Option(None, help="min-general: the base model's general metric "
                                                    "(default: base_<general> column, else the prediction at "
                                                    "the largest share tried)."),
    weight: list[str] = typer.Option([], help="weighted: DOMAIN=W (repeatable; default 1 for every domain)."),
    lower_is_better: bool = typer.Option(False, help="Metrics are losses (lower is better)."),
    delta: Optional[float] = typer.Option(None, help="Huber threshold (default 5% of each domain's spread)."),
    png: Optional[Path] = typer.Option(None, help="Plot path (default RESULTS with .png)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the fits + recommendation here."),
) -> None:
    """Fit the mixing law per eval domain, print parameters with fit errors, plot, recommend a share."""
    if rule not in law.RULES:
        raise typer.BadParameter(f"--rule must be one of {list(law.RULES)}, got {rule!r}")
    try:
        fit_and_report(results, rule, general_domain, tolerance, base, _weights(weight), not lower_is_better,
                       delta, png, json_out)
    except (law.ResultsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@app.command("sweep")
def sweep_cmd(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML of a run whose upstream stages are done."),
    out: Path = typer.Option(..., "--out", "-o", help="The run folder."),
    shares: str = typer.Option("0,0.1,0.2,0.3,0.5", help="General shares to try (comma-separated, 0..1)."),
    classifier: Optional[str] = typer.Option(None, help="Eval classifier whose accuracy is used (default first)."),
    metric: str = typer.Option("top1", help="top1 | top5"),
    rule: str = typer.Option("min-general", help="min-general | weighted"),
    general_domain: str = typer.Option("general"),
    tolerance: float = typer.Option(0.01),
    weight: list[str] = typer.Option([], help="weighted: DOMAIN=W (repeatable)."),
) -> None:
    """Train + evaluate small runs at several general shares, then fit and recommend (as `fit`)."""
    from ..recipe import RecipeError, load_recipe
    from ..store import RunStore
    from .sweep import SweepError, sweep

    try:
        values = [float(s) for s in shares.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--shares expects numbers like 0,0.1,0.2, got {shares!r}") from None
    try:
        r = load_recipe(recipe)
        store = RunStore(out)
        csv_path = sweep(r, store, values, classifier=classifier, metric=metric)
    except (RecipeError, SweepError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"results: {csv_path}")
    try:
        fit_and_report(csv_path, rule, general_domain, tolerance, None, _weights(weight), True, None, None,
                       csv_path.with_suffix(".fit.json"))
    except (law.ResultsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@app.command("show")
def show_cmd(out: Path = typer.Option(..., "--out", "-o", help="Run folder with a finished mix stage."),
             as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")) -> None:
    """Print a run's mix table: per bucket target vs realised share, and unmet targets."""
    from ..store import RunStore
    from .report import format_table, summary_lines, table_rows
    from .stage import load_report

    try:
        rep = load_report(RunStore(out))
    except FileNotFoundError:
        typer.echo(f"error: {out}/mix/mix_report.json not found: run the mix stage first", err=True)
        raise typer.Exit(2)
    rows = table_rows(rep)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(format_table(rows))
    for line in summary_lines(rep):
        typer.echo(line)
