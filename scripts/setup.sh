#!/usr/bin/env bash
# Create .venv with everything the project needs (CPU torch, no torchvision). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# img2dataset pulls in the Python 3.6 `dataclasses` backport; inside Prefect's server process
# (uvicorn --app-dir site-packages) it shadows the standard library and the server cannot start.
.venv/bin/python -m pip uninstall -y -q dataclasses 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, prefect, pipeline; print('environment ok: torch', torch.__version__, '| prefect', prefect.__version__)"
