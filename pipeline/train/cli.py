"""`alive train` and `alive eval`: the train/eval stage on its own, over an existing run folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from .. import layout

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune a CLIP on a run's shards; zero-shot eval.")


def _load(recipe: Path, out: Path, sets: list[str]):
    from ..cli_util import load_recipe_or_exit
    from ..store import RunStore

    r = load_recipe_or_exit(recipe, sets)
    if not out.is_dir():
        typer.echo(f"error: run folder {out} does not exist (build the dataset into it first: alive build)", err=True)
        raise typer.Exit(2)
    return r, RunStore(out)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("train")
def train_cmd(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML (its train: section)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder holding shards/wds (re-run it to resume)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.epochs=2"),
    verbose: bool = typer.Option(True, help="Log progress."),
) -> None:
    """Fine-tune train.model on OUT/shards/wds (train.loss clip/dalip, train.ssl none/dino) -> OUT/train/final."""
    _logging(verbose)
    r, store = _load(recipe, out, set_)
    from .train import run

    try:
        res = run(r, store)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    keys = ("configuration", "steps", "samples_trained", "loss_first", "loss_last", "final_dir", "resumed_from", "skipped")
    typer.echo(json.dumps({k: res.get(k) for k in keys}, indent=2))


@app.command("eval")
def eval_cmd(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML (its eval: section and role: eval sources)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (ingested eval sources, train/final)."),
    model: list[str] = typer.Option([], "--model", help="NAME=PATH_OR_ID, repeatable; default base and fine-tuned."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set eval.max_per_task=500"),
    verbose: bool = typer.Option(True, help="Log progress."),
) -> None:
    """Zero-shot top-1/top-5 on every role: eval source -> OUT/eval/results.{json,md}, zero_shot.png."""
    _logging(verbose)
    r, store = _load(recipe, out, set_)
    models: Optional[dict[str, str]] = None
    if model:
        models = {}
        for m in model:
            if "=" not in m:
                raise typer.BadParameter(f"--model expects NAME=PATH_OR_ID, got {m!r}")
            k, v = m.split("=", 1)
            models[k.strip()] = v.strip()
    from .evaluate import run

    try:
        res = run(r, store, models)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(store.path(layout.EVAL_MARKDOWN).read_text(encoding="utf-8"))
    if res.get("skipped"):
        typer.echo("(unchanged inputs: results from the previous run)")
