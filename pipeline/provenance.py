"""Which models a run used, as the card, the report and the CLI summary state them."""

from __future__ import annotations

from pathlib import Path

from .recipe import Recipe


def models_used(recipe: Recipe) -> dict[str, str]:
    """describe / score model names, and ``untrained: yes`` when any is a tiny locally built model."""
    d = recipe.describe
    out = {"describe": "template baseline (no LLM)" if d.backend == "template" else f"{d.backend}: {d.model}"}
    if recipe.score.enabled:
        out["score"] = recipe.score.model
    for m in (recipe.score.model if recipe.score.enabled else None, d.model, recipe.train.model):
        if m and Path(m).is_dir() and (Path(m) / "alive_tiny.json").exists():
            out["untrained"] = "yes"
    return out
