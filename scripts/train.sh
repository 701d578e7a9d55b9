#!/usr/bin/env bash
# The main job from a fresh machine with only Python: create the environment, build the package, run
# `dgr-fast train` (no arguments: the default comparison on the built-in multi-digits data set, on the CPU).
#   bash scripts/train.sh [dgr-fast train args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q -r requirements.txt
# --no-build-isolation: build the extension against the torch installed above, not a fresh one.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
exec .venv/bin/dgr-fast train "$@"
