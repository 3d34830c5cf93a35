#!/usr/bin/env bash
# The lock file in a fresh virtual environment: install exactly its versions (plus the CPU build of torch), then
# the entrypoint and the test suite. Run by hand: bash docker/check-lock.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d)/venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet 'torch==2.13.0'
"$VENV/bin/pip" install --quiet --no-deps -r docker/requirements.lock
"$VENV/bin/pip" install --quiet --no-deps -e .
"$VENV/bin/pip" check
"$VENV/bin/wmtp" --help > /dev/null
HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true "$VENV/bin/python" -m pytest -q tests
