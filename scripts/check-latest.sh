#!/usr/bin/env bash
# The test command against the newest releases of every dependency (not the pinned constraints.txt), in its own
# venv (.venv-latest), so a new release that breaks fp4cal is seen before a user meets it. Not part of CI:
# CI runs the pinned set. Usage: bash scripts/check-latest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest CONSTRAINTS="" bash scripts/bootstrap.sh
.venv-latest/bin/python -m pip install -q --upgrade -e ".[test]"
.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|compressed-tensors|safetensors) '
.venv-latest/bin/python -m pytest -q "$@"
