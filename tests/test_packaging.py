"""Packaging: what a plain `pip install .` gets (shipped prompts/ and recipes/, bounded pins, the lock) and
the environment check for img2dataset's `dataclasses` backport. The full plain-pip venv demo runs in CI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pipeline", "flows", "prompts", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, cwd=out, timeout=300)
    return next(out.glob("alive_factory-*.whl"))


def test_wheel_ships_prompts_and_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("prompts", "recipes"):
        repo = sorted(p.name for p in (ROOT / folder).glob("*.yaml"))
        shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith(f"pipeline/assets/{folder}/"))
        assert repo and shipped == repo, folder
    assert "pipeline/assets/recipes/demo.yaml" in names and "pipeline/cli.py" in names and "flows/build_alive.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_layout_resolves_the_shipped_folders(wheel, tmp_path):
    """Unpacked like site-packages (no checkout around it): asset_dir finds pipeline/assets/."""
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import pipeline.assets as a; print(a.asset_dir('prompts')); print(a.demo_recipe()); "
            "from pipeline.describe.template import resolve_prompts_dir; print(resolve_prompts_dir('prompts'))")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == lines[2] == str(site / "pipeline" / "assets" / "prompts")
    assert lines[1] == str(site / "pipeline" / "assets" / "recipes" / "demo.yaml")


def test_dependencies_have_upper_bounds_and_the_lock_covers_them():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"] + [d for extra in meta["optional-dependencies"].values() for d in extra]
    for d in deps:
        assert "==" in d or "<" in d, f"{d}: no upper bound"
    lock = {ln.split("==")[0].lower().replace("_", "-") for ln in (ROOT / "requirements.lock").read_text().splitlines()
            if re.match(r"^[A-Za-z0-9]", ln)}
    for d in meta["dependencies"] + meta["optional-dependencies"]["dev"] + meta["optional-dependencies"]["urls"]:
        name = re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower().replace("_", "-")
        assert name == "torch" or name in lock, f"{name} is not in requirements.lock (run scripts/lock.sh)"
    assert "dataclasses" not in lock and "torch" not in lock  # see scripts/lock.sh
    assert "img2dataset" not in " ".join(meta["dependencies"])  # an extra: a plain install has no backport


def test_backport_in_site_packages_is_named_with_the_fix(tmp_path):
    from pipeline.ops.envcheck import EnvironmentProblem, check_environment, shadowing_backports

    assert shadowing_backports(tmp_path) == []
    check_environment(tmp_path)
    (tmp_path / "dataclasses.py").write_text("# Python 3.6 backport\n")
    assert shadowing_backports(tmp_path) == [tmp_path / "dataclasses.py"]
    with pytest.raises(EnvironmentProblem, match=r"dataclasses\.py .*pip uninstall -y dataclasses"):
        check_environment(tmp_path)


def test_this_environment_passes_the_check():
    from pipeline.ops.envcheck import shadowing_backports

    assert shadowing_backports() == []
