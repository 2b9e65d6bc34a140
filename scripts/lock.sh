#!/usr/bin/env bash
# Regenerate requirements.lock: every dependency of pyproject.toml (extras dev + urls) at one exact version.
# torch is installed on its own (CPU or CUDA build, see setup.sh and the Dockerfiles), and the `dataclasses`
# backport that img2dataset declares is left out on purpose (Python >= 3.7 has it; the backport breaks
# Prefect's server). setup.sh, CI and the CPU image install this file with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-$(command -v uv || true)}
if [ -z "$UV" ]; then
  python3 -m venv /tmp/alive-lock-tools && /tmp/alive-lock-tools/bin/pip install -q uv
  UV=/tmp/alive-lock-tools/bin/uv
fi
"$UV" pip compile pyproject.toml --extra dev --extra urls --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --no-emit-package torch --no-emit-package dataclasses \
  --custom-compile-command "bash scripts/lock.sh" -o requirements.lock "$@"
