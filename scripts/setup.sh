#!/usr/bin/env bash
# Create .venv from the lock file: CPU torch, then every pinned dependency of requirements.lock, then the
# project itself (editable). Idempotent. No torchvision: CLIP runs through transformers.
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # where the default index has CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==2.13.0"
# --no-deps: the lock is complete, and it leaves out img2dataset's `dataclasses` backport (see scripts/lock.sh).
"${PIP[@]}" --no-deps -r requirements.lock
"${PIP[@]}" --no-deps -e .
# The same check `alive build` makes (an older .venv may still hold the backport; the message says how to fix it).
.venv/bin/python -c "from pipeline.ops.envcheck import check_environment; check_environment()"
.venv/bin/python -c "import torch, transformers, prefect, pipeline; print('environment ok: torch', torch.__version__, '| prefect', prefect.__version__)"
