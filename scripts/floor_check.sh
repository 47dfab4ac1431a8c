#!/usr/bin/env bash
# The transformers floor in pyproject.toml, tested: that version (with the hub client it needs) is
# installed into an overlay folder, .venv-floor/ (reused while the floor stays the same), put in
# front of .venv on PYTHONPATH, and the fast tests that touch the Trainer run against it.
# The rest of the stack (torch, peft, accelerate, bitsandbytes, datasets) is .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(grep -o '"transformers>=[0-9.]*' pyproject.toml | cut -d'=' -f2)
dir=.venv-floor
if [ "$(cat "$dir/.version" 2>/dev/null)" != "$floor" ]; then
  rm -rf "$dir"
  .venv/bin/python -m pip install -q --target "$dir" "transformers==$floor" 2>&1 | grep -v "dependency\|requires\|^WARNING: Location" || true
  rm -rf "$dir"/numpy "$dir"/numpy-* "$dir"/numpy.libs "$dir"/bin  # .venv's numpy, which torch was built with
  echo "$floor" > "$dir/.version"
fi
got=$(PYTHONPATH="$dir" .venv/bin/python -c "import transformers; print(transformers.__version__)")
PYTHONPATH="$dir" .venv/bin/python -c "from packaging.version import Version as V; assert V('$got') == V('$floor')" \
  || { echo "floor check: expected transformers $floor, got $got" >&2; exit 1; }
echo "floor check: transformers $got"
PYTHONPATH="$dir" .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_train.py tests/test_formats.py tests/test_faults.py tests/test_save_load.py tests/test_experts.py -k "not tmpfs and not moe_run_resumes"
