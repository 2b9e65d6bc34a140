"""CLI of the describe stage: ``alive describe`` and ``alive describe-prompts``.

Mounted by the main CLI: ``for cmd in describe.cli.app.registered_commands: app.registered_commands.append(cmd)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Class descriptions from an LLM (CuPL-style).", no_args_is_help=True)


@app.command("describe")
def describe_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (ingest must have run there)."),
    backend: Optional[str] = typer.Option(None, help="Override describe.backend (template|openai|transformers)."),
    base_url: Optional[str] = typer.Option(None, help="Override describe.base_url."),
    model: Optional[str] = typer.Option(None, help="Override describe.model."),
    concurrency: Optional[int] = typer.Option(None, help="Override describe.concurrency."),
) -> None:
    """Describe every ingested class and print the stage summary (requests, tokens/s, cache, rejects)."""
    from ..cli_util import load_recipe_or_exit
    from ..executor import run_stages
    from ..store import RunStore
    from . import STAGE, collect_classes, summary_lines

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {f"describe.{k}": v for k, v in (("backend", backend), ("base_url", base_url), ("model", model),
                                                ("concurrency", concurrency)) if v is not None}
    r = load_recipe_or_exit(recipe, overrides=overrides)
    store = RunStore(out)
    classes = collect_classes(r, store)
    if not classes:
        typer.echo(f"no ingested labeled classes under {store.root}; run ingest first", err=True)
        raise typer.Exit(2)
    stats = run_stages(r, store, [STAGE])[STAGE].stats
    for line in summary_lines(stats):
        typer.echo(line)
    if stats.counters.get("failed_classes"):
        raise typer.Exit(1)


@app.command("describe-prompts")
def prompts_cmd(
    class_name: str = typer.Argument(..., help="Class name, e.g. 'apple scab'."),
    domain: str = typer.Option("general", help="crops | livestock | fishery | general."),
    context: Optional[str] = typer.Option(None, help="Source context, e.g. 'apple leaf'."),
    prompts: str = typer.Option("prompts", help="Prompt folder."),
) -> None:
    """Show the messages the LLM would get for one class (no request is sent)."""
    from ..recipe import DescribeConfig
    from .prompts import load_prompt_sets

    ps = load_prompt_sets(DescribeConfig(prompts=prompts), {domain})[domain]
    typer.echo(f"# {ps.path} (prompt_sha {ps.sha}); sampling {ps.sampling}")
    typer.echo(f"[system] {ps.spec.system.strip()}")
    for p in ps.prompts_for(class_name, context):
        typer.echo(f"[{p.question_id}] {p.prompt}")
