"""DPO on the demo model: held-out reward accuracy and margin before and after, for olora and lora
at each one's best lr of a small sweep, with s/step and peak memory against SFT on the same batch.

The pairs are `qolora prepare-demo`'s (chosen = the question's own answer, rejected = another
question's answer): a test of the machinery on real text, not a benchmark of alignment. Every run
is its own process (`qolora train examples/dpo.yaml` with overrides), so each peak RSS is its own.
Resumable: a run folder with a finished `adapter/` is reused.

    python benchmarks/preference.py [--olora-lrs 3e-5,1e-4,3e-4] [--lora-lrs 3e-4,1e-3,3e-3] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

RUNS = Path("runs/pref")


def run(name: str, config: str, overrides: list[str]) -> dict:
    """``qolora train`` in its own process (reused when finished); its metrics.json."""
    out = RUNS / name
    if not (out / "adapter").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "qolora", "train", config, f"train.output_dir={out}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"failed": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--olora-lrs", default="3e-5,1e-4,3e-4")
    ap.add_argument("--lora-lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    common = [f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}", f"train.save_steps={args.steps}"]
    results: dict[str, dict] = {}
    for init, lrs in (("olora", args.olora_lrs), ("lora", args.lora_lrs)):
        for lr in lrs.split(","):
            m = run(f"{init}-lr{lr}", "examples/dpo.yaml", [*common, f"adapter.init={init}", f"train.lr={lr}"])
            results[f"{init}-lr{lr}"] = m
            if "failed" not in m:
                e0, e1 = m["eval"][0], m["eval"][-1]
                print(
                    f"{init} lr {lr}: acc {e0['eval_rewards/accuracies']:.3f} -> {e1['eval_rewards/accuracies']:.3f}, "
                    f"margin {e0['eval_rewards/margins']:.4f} -> {e1['eval_rewards/margins']:.4f}, "
                    f"{m['step_s_median']} s/step",
                    flush=True,
                )
            else:
                print(f"{init} lr {lr}: {m['failed']}", flush=True)
    sft = run(
        "sft",
        "examples/sft/demo.yaml",
        [*common, "train.batch_size=4", "data.max_eval_rows=32", "train.lr=3e-4"],
    )
    results["sft"] = sft
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    keep = ("eval", "history", "step_s_median", "peak_memory_bytes", "lr", "failed")
    (Path("benchmarks/results") / "preference.json").write_text(
        json.dumps({k: {f: v.get(f) for f in keep} for k, v in results.items()}, indent=1) + "\n"
    )
    print(
        _common.row(
            "run",
            "lr",
            "eval reward accuracy (step 0 -> end)",
            "eval margin (step 0 -> end)",
            "s/step (median)",
            "peak RSS GiB",
            "command",
            "machine",
            "date",
        )
    )
    for init in ("olora", "lora"):
        ok = {k: v for k, v in results.items() if k.startswith(init + "-") and "failed" not in v}
        if not ok:
            continue
        end = {k: v["eval"][-1] for k, v in ok.items()}  # best: held-out accuracy, then margin
        best = max(ok, key=lambda k: (end[k]["eval_rewards/accuracies"], end[k]["eval_rewards/margins"]))
        m = ok[best]
        e0, e1 = m["eval"][0], m["eval"][-1]
        print(
            _common.row(
                f"DPO {init} r16 (best of {len(ok)} lrs)",
                m["lr"]["value"],
                f"{e0['eval_rewards/accuracies']:.3f} -> **{e1['eval_rewards/accuracies']:.3f}**",
                f"{e0['eval_rewards/margins']:.4f} -> **{e1['eval_rewards/margins']:.4f}**",
                m["step_s_median"],
                f"{m['peak_memory_bytes']['cpu_peak_rss'] / 2**30:.2f}",
                f"`{_common.command()}`",
                _common.machine(),
                _common.today(),
            )
        )
    if "failed" not in sft:
        print(
            _common.row(
                "SFT, same batch (4 prompt+chosen rows)",
                sft["lr"]["value"],
                "-",
                "-",
                sft["step_s_median"],
                f"{sft['peak_memory_bytes']['cpu_peak_rss'] / 2**30:.2f}",
                f"`{_common.command()}`",
                _common.machine(),
                _common.today(),
            )
        )


if __name__ == "__main__":
    main()
