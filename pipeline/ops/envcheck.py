"""Checks of the installed environment that would otherwise fail deep inside another tool."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

# Standard-library modules that old PyPI backports re-install into site-packages (img2dataset still
# depends on the Python 3.6 `dataclasses` backport).
_BACKPORTS = ("dataclasses",)


class EnvironmentProblem(RuntimeError):
    """The environment cannot run a build; the message names the file and the command that fixes it."""


def shadowing_backports(site_dir: Optional[Path] = None) -> list[Path]:
    """Backport modules in ``site_dir`` (default: where Prefect is installed) that shadow the standard library.

    Prefect starts its API server as ``python -m uvicorn --app-dir <site-packages>``, which puts
    site-packages ahead of the standard library: a ``dataclasses.py`` there replaces the real module
    and the server dies with ``dataclass() got an unexpected keyword argument 'slots'``.
    """
    if site_dir is None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            return []
        site_dir = Path(list(spec.submodule_search_locations)[0]).parent
    found = []
    for name in _BACKPORTS:
        for cand in (site_dir / f"{name}.py", site_dir / name / "__init__.py"):
            if cand.is_file():
                found.append(cand)
    return found


def check_environment(site_dir: Optional[Path] = None) -> None:
    """Raise EnvironmentProblem when a backport would break Prefect's server (see shadowing_backports)."""
    bad = shadowing_backports(site_dir)
    if bad:
        names = " ".join(sorted({p.stem if p.stem != "__init__" else p.parent.name for p in bad}))
        raise EnvironmentProblem(
            f"{bad[0]} (a Python 3.6 backport, installed by img2dataset's dependencies) shadows the standard "
            f"library inside Prefect's server process, which then cannot start. Remove it: "
            f"pip uninstall -y {names}  (img2dataset works without it on Python >= 3.7)")
