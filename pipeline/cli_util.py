"""Helpers shared by every `alive` sub-command: --set parsing and recipe loading with a clean exit."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from .recipe import Recipe, RecipeError, load_recipe


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """['score.min_score=0.3', ...] -> {'score.min_score': 0.3} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise typer.BadParameter(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def load_recipe_or_exit(recipe: Path, sets: Optional[list[str]] = None, overrides: Optional[dict] = None) -> Recipe:
    """Load and validate a recipe; on a bad recipe print the problems and exit with code 2."""
    try:
        return load_recipe(recipe, {**parse_sets(sets or []), **(overrides or {})})
    except RecipeError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
