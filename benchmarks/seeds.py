"""Reproduce the seed papers' claims on the real demo model (SmolLM2-135M-Instruct, 4-bit NF4).

1. OLoRA converges faster than LoRA at the same rank (arXiv 2406.01775): `compare` at r=16 and
   r=64 on two datasets: chatterbot Q/A (the demo data) and Python stdlib docstrings.
2. LoRA learns less and forgets less (arXiv 2405.09673): for every run, learn = base − tuned
   loss on the run's own eval set, forget = tuned − base loss on the *other* dataset's eval set.

Needs `qolora prepare-demo --out demo` first. Resumable: finished runs and evals are reused.
Plots and JSON go to benchmarks/results/; run dirs (checkpoints) to runs/seeds/.

    python benchmarks/seeds.py [--ranks 16,64] [--steps 40] [--eval-rows 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from qolora._io import write_json_atomic  # noqa: E402
from qolora.config import load_config  # noqa: E402
from qolora.training.compare import compare, format_summary  # noqa: E402
from qolora.training.evaluate import evaluate  # noqa: E402

DATASETS = {
    "chatterbot": ("demo/data/train.jsonl", "demo/data/eval.jsonl"),
    "pydoc": ("demo/data/pydoc_train.jsonl", "demo/data/pydoc_eval.jsonl"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--datasets", default="chatterbot,pydoc")
    args = ap.parse_args()
    results = Path("benchmarks/results")
    results.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    rows, all_lf = [], {}
    names = args.datasets.split(",")
    for ds in names:
        train, ev = DATASETS[ds]
        other = DATASETS[next(n for n in DATASETS if n != ds)][1]
        cfg = load_config(
            "examples/sft/demo.yaml",
            [
                f"data.train={train}",
                f"data.eval={ev}",
                f"data.max_eval_rows={args.eval_rows}",
                f"train.max_steps={args.steps}",
                "train.eval_steps=10",
                "train.save_steps=20",
            ],
        )
        out = Path("runs/seeds") / ds
        summary = compare(cfg, ["olora", "lora"], ranks, out)
        print(f"== {ds}\n{format_summary(summary)}", flush=True)
        shutil.copy(out / "compare.png", results / f"{ds}-compare.png")
        shutil.copy(out / "compare.json", results / f"{ds}-compare.json")
        for run in summary["runs"]:
            path = out / run / "learn_forget.json"
            if not path.is_file():
                write_json_atomic(path, evaluate(out / run / "adapter", ev, other, max_rows=args.eval_rows))
            lf = json.loads(path.read_text())
            all_lf[f"{ds}/{run}"] = {k: lf[k] for k in ("learn", "forget")} | {
                "base_target": lf["base_target"]["loss"],
                "tuned_target": lf["tuned_target"]["loss"],
                "base_source": lf["base_source"]["loss"],
                "tuned_source": lf["tuned_source"]["loss"],
            }
        for r in ranks:
            o, lo = summary["runs"][f"olora-r{r}"], summary["runs"][f"lora-r{r}"]
            lfo, lfl = all_lf[f"{ds}/olora-r{r}"], all_lf[f"{ds}/lora-r{r}"]
            rows.append(
                _common.row(
                    f"{ds}, r={r}, {args.steps} steps x 8",
                    f"{o['steps_to_target']} / {lo['steps_to_target']}",
                    f"{o['final_eval_loss']:.3f} / {lo['final_eval_loss']:.3f}",
                    f"{lfo['learn']:+.3f} / {lfl['learn']:+.3f}",
                    f"{lfo['forget']:+.3f} / {lfl['forget']:+.3f}",
                    f"target loss {summary['target_loss']:.3f}; eval on {args.eval_rows} rows",
                    f"`{_common.command()}`",
                    _common.machine(),
                    _common.today(),
                )
            )
    write_json_atomic(results / "learn_forget.json", all_lf)
    print(
        "| dataset, rank | steps to target (OLoRA / LoRA) | final eval loss | learn | forget | notes "
        "| command | machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
