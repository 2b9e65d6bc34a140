"""Folders shipped with the package: the prompt sets (``prompts/``) and the recipes (``recipes/``).

In a checkout (or an editable install) they are the top-level folders of the repository; an installed
wheel carries them as ``pipeline/assets/<name>`` (see setup.py). Callers ask for a folder by name and
get whichever exists, the checkout first so that edits there take effect.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
SHIPPED = ("prompts", "recipes")


def asset_dir(name: str) -> Path:
    """The shipped folder ``name`` (``prompts`` or ``recipes``).

    Raises:
        FileNotFoundError: neither the checkout nor the installed package has it (a broken install).
    """
    if name not in SHIPPED:
        raise ValueError(f"unknown asset folder {name!r}; one of {SHIPPED}")
    checkout = REPO_ROOT / name if (REPO_ROOT / "pyproject.toml").is_file() else None
    for cand in (checkout, PACKAGE_DIR / "assets" / name):
        if cand is not None and cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    raise FileNotFoundError(f"the {name}/ folder is missing from {REPO_ROOT} and from {PACKAGE_DIR / 'assets'}; "
                            "reinstall the package (pip install .) from a complete checkout")


def demo_recipe() -> Path:
    """recipes/demo.yaml of the checkout or of the installed package."""
    return asset_dir("recipes") / "demo.yaml"
