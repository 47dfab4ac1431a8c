#!/usr/bin/env bash
# The README's main job: set up .venv, make the offline demo model and data, fine-tune
# SmolLM2-135M-Instruct in 4-bit with OLoRA, and print eval loss before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
.venv/bin/qolora prepare-demo --out demo
rm -rf runs/demo
.venv/bin/qolora train examples/sft/demo.yaml "$@"
.venv/bin/python - <<'PY'
import json
m = json.load(open("runs/demo/metrics.json"))
ev = m["eval"]
print(f"eval loss: {ev[0]['eval_loss']:.3f} at step {ev[0]['step']} -> {ev[-1]['eval_loss']:.3f} at step {ev[-1]['step']}")
print(f"train: {m['global_step']} steps in {m['wall_time_s']:.0f} s, {m['tokens_per_s']} tokens/s")
print("outputs: runs/demo/adapter (PEFT adapter + qolora.json), runs/demo/metrics.json, runs/demo/loss.png")
PY
echo "demo finished in $(( $(date +%s) - start )) s"
