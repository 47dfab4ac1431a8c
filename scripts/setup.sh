#!/usr/bin/env bash
# Create .venv and install QOLoRA with its dev extras, at the versions the suite last passed with
# (constraints.txt; scripts/latest_check.sh tries the newest). Safe to re-run: it reinstalls only
# when pyproject.toml or constraints.txt changed. torch==2.13.0 goes first: it is a CPU build on
# this project's machines, and a plain `torch` requirement would pull a multi-GB CUDA build instead.
# QOLORA_CONSTRAINTS=none installs without the constraints (the newest releases pip finds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.qolora-install-stamp
constraints=${QOLORA_CONSTRAINTS:-constraints.txt}
want=$(cat pyproject.toml "$constraints" 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q "torch==${QOLORA_TORCH_VERSION:-2.13.0}"
  if [ "$constraints" = none ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
  else
    .venv/bin/python -m pip install -q -c "$constraints" -e ".[dev]"
  fi
  echo "$want" > "$stamp"
fi
# llama.cpp's GGUF converter, pinned (qolora/export/gguf.py): fetched here, with the other
# downloads, once into ~/.cache/qolora, so that the test suite itself downloads nothing.
.venv/bin/python -c "from qolora.export.gguf import llama_cpp_dir; llama_cpp_dir()" \
  || echo "setup: could not fetch llama.cpp's converter; the GGUF tests will skip" >&2
