#!/usr/bin/env bash
# One command from a fresh machine with only Python: create the environment, build the package, run the tests.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build the extension against the torch installed above, not a fresh one.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
exec .venv/bin/python -m pytest -q "$@"
