"""`alive score ...` commands: score a run folder, show its score summary, check bf16/fp32 parity.

Mount in pipeline/cli.py with ``app.add_typer(score_cli.app, name="score")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="CLIP scoring, filters, dedup and eval decontamination.", no_args_is_help=True)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    width = {c: max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(str(c).ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder with ingest and pair outputs."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set score.min_score=0.3"),
) -> None:
    """Score every ingested part (train and eval) of a run, then apply the global filters."""
    from .. import layout
    from ..cli_util import load_recipe_or_exit
    from ..executor import run_stages
    from ..ingest import ingested_parts
    from ..store import RunStore
    from .stage import FINAL_STAGE, STAGE, load_summary, summary_rows

    r = load_recipe_or_exit(recipe, set_)
    store = RunStore(out)
    if not ingested_parts(store, r):
        typer.echo(f"error: no ingest parts under {store.path(layout.INGEST)}: run the earlier stages first", err=True)
        raise typer.Exit(1)
    try:
        reports = run_stages(r, store, [STAGE, FINAL_STAGE])
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    for pu in reports[STAGE].plan.units:
        typer.echo(f"{pu.name}: {'scored' if pu.pending else 'unchanged'}", err=True)
    fin = reports[FINAL_STAGE].stats
    typer.echo(_table(summary_rows(load_summary(store))))
    typer.echo(f"kept {fin.kept} of {fin.total} pairs; selection at {store.path(layout.SELECTION)}")


@app.command("summary")
def summary_cmd(
    out: Path = typer.Argument(..., help="Run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole summary JSON (histograms included)."),
) -> None:
    """Counts kept/dropped per reason and per source, and score statistics per domain."""
    from ..store import RunStore
    from .stage import load_summary, summary_rows

    try:
        s = load_summary(RunStore(out))
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    typer.echo(f"model: {s['model']}")
    typer.echo(_table(summary_rows(s)))
    typer.echo("")
    typer.echo(_table([{"domain": d, "pairs": h["pairs"], "kept": h["kept"], "mean_score": h["mean"],
                        "median_score": h["median"]} for d, h in s["histograms"].items()]))


@app.command("parity")
def parity_cmd(
    model: str = typer.Argument(..., help="Hub id (cached) or local folder of a CLIP/SigLIP model."),
    images: Path = typer.Argument(..., help="Folder of images (jpg/png) to score."),
    captions: list[str] = typer.Option(["a photo of a plant.", "a photo of an animal."], "--caption", "-c"),
    limit: Optional[int] = typer.Option(64, help="Use at most this many images."),
) -> None:
    """Score parity of bf16 vs fp32 on CPU: mean and max absolute difference of the scores."""
    import numpy as np

    from .encoder import Encoder

    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})[:limit]
    if not files:
        typer.echo(f"error: no images under {images}", err=True)
        raise typer.Exit(1)
    data = [p.read_bytes() for p in files]
    scores = {}
    for dt in ("fp32", "bf16"):
        enc = Encoder(model, device="cpu", dtype=dt)
        img, errors = enc.encode_images(data)
        scores[dt] = img @ enc.encode_texts(captions).T
    d = np.abs(scores["bf16"] - scores["fp32"])
    typer.echo(json.dumps({"model": model, "pairs": int(d.size), "mean_abs": float(d.mean()),
                           "max_abs": float(d.max())}))
