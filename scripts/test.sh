#!/usr/bin/env bash
# The README's test command: set up .venv (scripts/setup.sh), lint and format-check with ruff
# (configured in pyproject.toml), run the default suite, PEFT's own OLoRA tests as a client
# (scripts/peft_client.sh), the fast tests on the transformers floor (scripts/floor_check.sh), and
# a fast subset on the newest releases, reported without blocking (scripts/latest_check.sh).
# Extra arguments go to pytest (and skip the rest after it).
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
[ "$rc" -eq 0 ] || exit "$rc"
[ $# -eq 0 ] || exit 0  # a run of chosen tests skips the client and the floor
bash scripts/peft_client.sh || exit 1
# the fast tests again on the lowest transformers pyproject.toml allows (scripts/floor_check.sh)
bash scripts/floor_check.sh || exit 1
# a fast subset on the newest releases: reported, never failing the run (QOLORA_LATEST_CHECK=0 skips it)
[ "${QOLORA_LATEST_CHECK:-1}" = 0 ] || bash scripts/latest_check.sh
