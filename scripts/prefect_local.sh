#!/usr/bin/env bash
# Local Prefect server (SQLite, 127.0.0.1) + process worker for this project.
#   scripts/prefect_local.sh start [--port 4200] [--state-dir .prefect] [--no-ui] [--no-profile]
#   scripts/prefect_local.sh status
#   scripts/prefect_local.sh stop
# Details: docs/operations.md and pipeline/ops/local_prefect.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${ALIVE_PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="$(command -v python3 || command -v python)"; fi
fi
cd "$root"
exec "$py" -m pipeline.ops.local_prefect "$@"
