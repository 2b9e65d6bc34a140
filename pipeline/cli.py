"""`alive` command line: build, demo, validate, schema (+ the stage tools mounted below)."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer

from .assets import demo_recipe
from .cli_util import load_recipe_or_exit, parse_sets
from .recipe import RecipeError, recipe_json_schema

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ALive dataset factory: agriculture image-text data.")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _print_summary(result: dict) -> None:
    rows = result.get("stages", [])
    typer.echo(f"\nrun folder: {result['out']}")
    typer.echo(f"{'stage':<12}{'units':>7}{'run':>6}{'total':>9}{'kept':>9}{'dropped':>9}  {'seconds':>8}  reasons")
    for r in rows:
        typer.echo(f"{r['stage']:<12}{r['units']:>7}{r['run']:>6}{r['total']:>9}{r['kept']:>9}{r['dropped']:>9}  "
                   f"{r['seconds']:>8}  {r['reasons']}")
    for line in result.get("describe_summary") or []:
        typer.echo(f"describe: {line}")
    if result.get("mix_table"):
        typer.echo("mix (target vs realised share per bucket):\n" + result["mix_table"])
    typer.echo(f"shards: {result.get('shards')}  samples: {result.get('samples')}")
    for k, v in (result.get("models") or {}).items():
        typer.echo(f"model[{k}]: {v}")


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # The in-process (ephemeral) API server is slow to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


class _DropTraceback(logging.Filter):
    """Keep Prefect's failure lines but not the traceback of an error the CLI states in one line."""

    def __init__(self, types: tuple[type[BaseException], ...]):
        super().__init__()
        self.types = types

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, self.types):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def _no_traceback_for(types: tuple[type[BaseException], ...]) -> Iterator[None]:
    f = _DropTraceback(types)
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


@app.command()
def build(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (re-use it to resume)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set score.min_score=0.3"),
    progress: bool = typer.Option(True, help="Progress bars on stderr."),
) -> None:
    """Run the build-alive flow (every stage) for RECIPE into OUT."""
    _quiet_prefect()
    overrides = parse_sets(set_)
    r = load_recipe_or_exit(recipe, overrides=overrides)  # fail fast, before starting Prefect
    from .sources import SourceError
    from .sources.inspect import preflight

    try:
        preflight(r)  # every source opened cheaply, in parallel: one message naming every bad source
    except SourceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    from .ops.envcheck import EnvironmentProblem, check_environment

    try:
        check_environment()
    except EnvironmentProblem as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    from flows.build_alive import build_alive

    from .describe.llm import DescribeError

    clear = (RecipeError, ValueError, OSError, DescribeError)  # OSError: a full disk, an unwritable --out
    try:
        with _no_traceback_for(clear):
            result = build_alive(str(recipe), str(out), overrides or None, progress)
    except clear as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    _print_summary(result)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder."),
    recipe: Path = typer.Option(demo_recipe(), "--recipe", "-r", help="Default: the shipped recipes/demo.yaml."),
    progress: bool = typer.Option(True, help="Progress bars on stderr."),
) -> None:
    """Offline demo: build the tiny local models if missing, then build recipes/demo.yaml."""
    from .ops.demo_models import ensure_demo_models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for p in ensure_demo_models(load_recipe_or_exit(recipe)):
        typer.echo(f"tiny untrained CLIP at {p} (built locally; relative paths are relative to the working directory)")
    build(recipe=recipe, out=out, set_=[], progress=progress)


@app.command()
def validate(recipe: Path) -> None:
    """Check a recipe; prints the problems (with the key and the file) or 'ok'."""
    r = load_recipe_or_exit(recipe)
    typer.echo(f"ok: {r.name} ({len(r.sources)} sources, hash {r.sha})")


@app.command()
def schema(out: Path = typer.Option(PROJECT_ROOT / "schemas", help="Folder to write the schemas to.")) -> None:
    """Write the recipe JSON Schema and the Arrow table schemas (schemas/)."""
    from .tables import dump_all

    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.schema.json").write_text(json.dumps(recipe_json_schema(), indent=2, sort_keys=True) + "\n")
    (out / "tables").mkdir(exist_ok=True)
    for name, text in dump_all().items():
        (out / "tables" / f"{name}.json").write_text(text)
    typer.echo(f"schemas written to {out}")


sources_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Look into a recipe's sources before building.")
app.add_typer(sources_app, name="sources")


@sources_app.command("inspect")
def sources_inspect(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    source: list[str] = typer.Option([], "--source", "-s", help="Only this source (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of text."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, as for build."),
) -> None:
    """Open each source cheaply and show its columns, labels (with counts), licence, what the recipe keeps,
    drops and renames, and what would fail. Exits 1 when any source would fail."""
    from .sources import SourceError
    from .sources.inspect import format_report, inspect_recipe

    r = load_recipe_or_exit(recipe, overrides=parse_sets(set_))
    try:
        reports = inspect_recipe(r, names=source or None)
    except SourceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps([x.to_dict() for x in reports], indent=2, ensure_ascii=False))
    else:
        typer.echo("\n\n".join(format_report(x) for x in reports))
        bad = [x.name for x in reports if not x.ok]
        typer.echo(f"\n{len(reports) - len(bad)} of {len(reports)} sources ok" + (f"; failing: {bad}" if bad else ""))
    if any(not x.ok for x in reports):
        raise typer.Exit(1)


def _mount() -> None:
    """Stage tools that live with their stage."""
    try:
        from .mix.cli import app as mixing_law_app

        app.add_typer(mixing_law_app, name="mixing-law", help="Fit data-mixing laws and pick a general share.")
    except ImportError:
        pass
    try:
        from .describe.cli import app as describe_app

        app.registered_commands += describe_app.registered_commands
    except ImportError:
        pass
    try:
        from .score.cli import app as score_app

        app.add_typer(score_app, name="score", help="Score pairs with CLIP, summaries, bf16 parity.")
    except ImportError:
        pass
    try:
        from .train.cli import app as train_app

        for cmd in train_app.registered_commands:
            app.registered_commands.append(cmd)
    except ImportError:
        pass
    for mod in ("upload", "report"):
        try:
            m = __import__(f"pipeline.{mod}", fromlist=["register_cli"])
            if hasattr(m, "register_cli"):
                m.register_cli(app)
        except ImportError:
            pass


_mount()


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
