"""Packages of the ALive dataset factory, plus the top-level prompts/ and recipes/ folders shipped as package data.

prompts/ and recipes/ stay at the top of the repository (where users edit them); in a wheel they are installed as
``pipeline/assets/prompts`` and ``pipeline/assets/recipes``, so ``alive demo`` works from any folder after a
plain ``pip install .``. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

ASSETS = {"pipeline.assets.prompts": "prompts", "pipeline.assets.recipes": "recipes"}

setup(
    packages=find_packages(include=["pipeline", "pipeline.*", "flows", "flows.*"]) + sorted(ASSETS),
    package_dir=ASSETS,
    package_data={name: ["*.yaml"] for name in ASSETS},
    include_package_data=False,
)
