#!/usr/bin/env bash
# The GPU proof in one command, under 8 minutes on an H100/H200 (docs: BENCHMARKS.md, "On a GPU").
#
#   bash scripts/gpu_check.sh OUTDIR              # on the GPU machine
#   bash scripts/gpu_check.sh --rehearse OUTDIR   # on the CPU, tiny shapes (the default test suite runs it)
#
# Writes at most 7 files to OUTDIR: env, tests, memory, context, init and summary .json, and
# gpu_check.log. Each part runs in its own time box (benchmarks/gpu_check.py, BOXES) inside
# the whole budget ($GPU_CHECK_BUDGET seconds: 450 on a GPU, 900 rehearsing); a part that fails
# or times out keeps what it measured and the next part still runs. Then it prints the
# BENCHMARKS.md rows and which goals were met. Exit status: 0 when every part is ok.
#
# On a machine without bitsandbytes or datasets (the GPU image), carry the wheels in .whl/
# (docs/gpu-check.md); they are installed into /tmp/qolora-site with
# --no-index --no-deps and put on PYTHONPATH, never with pip install -e.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=""
OUT=""
for a in "$@"; do
  case "$a" in
    --rehearse) REHEARSE="--rehearse" ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: error: unknown option $a" >&2; exit 2 ;;
    *) OUT="$a" ;;
  esac
done
if [ -z "$OUT" ]; then echo "gpu_check.sh: error: give the output folder: gpu_check.sh [--rehearse] OUTDIR" >&2; exit 2; fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
if [ -d .whl ] && ! "$PY" -c "import bitsandbytes, datasets" 2>/dev/null; then
  echo "installing the carried wheels: $(ls .whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/qolora-site .whl/*.whl || echo "gpu_check.sh: wheel install failed" >&2
  export PYTHONPATH="/tmp/qolora-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1
BUDGET="${GPU_CHECK_BUDGET:-$([ -n "$REHEARSE" ] && echo 900 || echo 450)}"
status=0
for part in env tests memory context init; do
  box=$("$PY" benchmarks/gpu_check.py box --of "$part" --out "$OUT" $REHEARSE)
  left=$(( BUDGET - ($(date +%s) - start) - 10 ))
  [ "$left" -lt "$box" ] && box=$left
  if [ "$box" -le 5 ]; then
    echo "== $part: skipped, the budget of ${BUDGET} s is spent"
    "$PY" benchmarks/gpu_check.py mark --of "$part" --rc 124 --out "$OUT"
    status=1
    continue
  fi
  echo "== $part (time box ${box} s)"
  timeout --signal=TERM --kill-after=10 "$box" "$PY" benchmarks/gpu_check.py "$part" --out "$OUT" --box "$box" $REHEARSE
  rc=$?
  "$PY" benchmarks/gpu_check.py mark --of "$part" --rc "$rc" --out "$OUT"
  [ "$rc" -ne 0 ] && status=1
done
echo "== summary after $(( $(date +%s) - start )) s"
"$PY" benchmarks/gpu_check.py summary --out "$OUT" $REHEARSE
exit $status
