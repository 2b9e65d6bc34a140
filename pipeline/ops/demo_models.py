"""Build the tiny local models a demo recipe names, when missing (the demo deployment's pull step).

``python -m pipeline.ops.demo_models recipes/demo.yaml`` does what ``alive demo`` does before its
build: every model of the recipe that is a local path containing "tiny" is built from config with
random weights (no download). Paths are relative to the working directory, as in the recipe.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from ..recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


def tiny_model_paths(recipe: Recipe) -> list[Path]:
    """Local model folders of the recipe that are meant to be built locally (name contains 'tiny')."""
    out = []
    for m in {recipe.score.model if recipe.score.enabled else None, recipe.train.model}:
        if m and "tiny" in m and not m.startswith(("openai/", "google/")):
            out.append(Path(m))
    return sorted(out)


def ensure_demo_models(recipe: Recipe) -> list[Path]:
    """Build every tiny model of ``recipe`` that does not exist yet; returns their folders."""
    from ..tiny_models import build_tiny_clip

    names: list[str] = []
    for s in recipe.sources:
        names += list(getattr(s, "classes", []) or [])
    built = []
    for p in tiny_model_paths(recipe):
        built.append(build_tiny_clip(p, extra_text=names))
        log.info("tiny untrained CLIP ready at %s", p)
    return built


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for p in ensure_demo_models(load_recipe(args.recipe)):
        print(f"ready: {p}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
