#!/usr/bin/env bash
# PEFT's own OLoRA tests as a client of QOLoRA (../shared/clients/peft-olora-tests, when that folder
# exists; its README says how they were taken from PEFT). They run with OLORA_IMPL=qolora and must
# pass, except the intended refusals listed below (and in that README), which must fail.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${PEFT_CLIENT_DIR:-../shared/clients/peft-olora-tests}
if [ ! -d "$dir" ]; then
  echo "peft client: $dir not found; skipped"
  exit 0
fi
REFUSALS=(
  "test_olora_gpu_examples.py::TestOLoRA::test_olora_with_quantized_model[8-default]"
  "test_olora_gpu_examples.py::TestOLoRA::test_olora_with_quantized_model[8-off]"
  "test_olora_gpu_examples.py::TestOLoRA::test_olora_with_quantized_model[4-default]"
  "test_olora_gpu_examples.py::TestOLoRA::test_olora_with_quantized_model[4-off]"
)
venv=$PWD/.venv
models=$venv/peft-client-models  # the client's tiny models, built once (its folder may be read-only)
report=$(mktemp)
(cd "$dir" && OLORA_IMPL=qolora TINY_MODELS_DIR="$models" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  -o junit_family=xunit1 --junitxml "$report" test_olora_initialization.py test_olora_gpu_examples.py >/dev/null 2>&1)
"$venv/bin/python" - "$report" "${REFUSALS[@]}" <<'PY'
import sys
import xml.etree.ElementTree as ET

report, refusals = sys.argv[1], set(sys.argv[2:])
failed, passed = set(), set()
for case in ET.parse(report).iter("testcase"):
    name = f"{case.get('file') or case.get('classname').split('.')[0] + '.py'}::{case.get('classname').split('.')[-1]}::{case.get('name')}"
    bad = case.find("failure") is not None or case.find("error") is not None
    (failed if bad else passed).add(name)
unexpected, missing = failed - refusals, refusals - failed
print(f"peft client (OLORA_IMPL=qolora): {len(passed)} passed, {len(failed & refusals)} intended refusals")
if unexpected or missing or not passed:
    for n in sorted(unexpected):
        print(f"peft client: FAILED {n}", file=sys.stderr)
    for n in sorted(missing):
        print(f"peft client: {n} should be refused and was not", file=sys.stderr)
    sys.exit(1)
PY
rc=$?
rm -f "$report"
exit $rc
