#!/usr/bin/env bash
# The README's test command: set up .venv (scripts/setup.sh), lint and format-check with ruff
# (configured in pyproject.toml), then run the default suite. Extra arguments go to pytest.
# pytest's exit code 5 (no tests collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "setup failed" >&2; exit 1; }
.venv/bin/ruff check . || { echo "ruff check failed: run .venv/bin/ruff check --fix ." >&2; exit 1; }
.venv/bin/ruff format --check . || { echo "ruff format check failed: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
