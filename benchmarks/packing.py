"""Padded, length-grouped and packed batches on the demo: padding fraction and real tokens per second.

    python benchmarks/packing.py [--steps 10]

Trains examples/demo.yaml (OLoRA r16, 4-bit, chatterbot) for --steps steps three ways: padded batches
of 8 (today's default), batches of 8 grouped by length (data.group_by_length), and padding-free packs
(data.packing, max_length 512, one pack per step: about as many real tokens per step as a padded
batch of 8 holds). It counts, in every batch the collator builds, the positions that are padding, and
times the steps (first step left out: warm-up). Prints the BENCHMARKS.md rows and writes
benchmarks/results/packing.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import qolora.training.run as run  # noqa: E402
from qolora._io import write_json_atomic  # noqa: E402
from qolora.config import load_config  # noqa: E402
from qolora.training import tokenize  # noqa: E402

MODES = {
    "padded": ["train.batch_size=8"],
    "grouped": ["train.batch_size=8", "data.group_by_length=true"],
    "packed": ["train.batch_size=1", "data.packing=true"],
}


class Timer(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        self.ends.append(time.perf_counter())


def measure(mode: str, steps: int) -> dict:
    counts = {"positions": [], "real": []}
    real_call = tokenize.Collator.__call__

    def counting(self, batch):  # noqa: ANN001
        out = real_call(self, batch)
        mask = out.get("attention_mask")
        n = out["input_ids"].numel()
        counts["positions"].append(n)
        counts["real"].append(int(mask.sum()) if mask is not None else n)
        return out

    timer = Timer()
    build = run.build_trainer

    def build_with_timer(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(timer)
        return trainer

    tokenize.Collator.__call__ = counting
    run.build_trainer = build_with_timer
    try:
        out = Path("runs/packing") / mode
        cfg = load_config(
            "examples/demo.yaml",
            [
                *MODES[mode],
                f"train.max_steps={steps}",
                "train.eval_steps=1000",
                "train.save_steps=1000",
                f"train.output_dir={out}",
                "data.max_eval_rows=8",
            ],
        )
        if out.exists():
            import shutil

            shutil.rmtree(out)
        run.train(cfg)
    finally:
        tokenize.Collator.__call__ = real_call
        run.build_trainer = build
    # the train batches are the last `steps` collations (eval batches come first, at step 0)
    pos, real = counts["positions"][-steps:], counts["real"][-steps:]
    secs = timer.ends[-1] - timer.ends[0]  # steps 2..N: the first is warm-up
    return {
        "steps": steps,
        "positions": sum(pos),
        "real_tokens": sum(real),
        "padding_fraction": 1 - sum(real) / sum(pos),
        "real_tokens_per_s": sum(real[1:]) / secs,
        "s_per_step": secs / (steps - 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    res = {m: measure(m, args.steps) for m in MODES}
    write_json_atomic(Path("benchmarks/results/packing.json"), res)
    print("| batches | padding fraction | real tokens / step | real tokens/s | s/step | command | machine | date |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in res.items():
        print(
            _common.row(
                f"{m} ({' '.join(MODES[m])}), {args.steps} steps",
                f"{r['padding_fraction']:.1%}",
                f"{r['real_tokens'] / r['steps']:.0f}",
                f"{r['real_tokens_per_s']:.0f}",
                f"{r['s_per_step']:.2f}",
                f"`{_common.command()}`",
                _common.machine(),
                _common.today(),
            )
        )


if __name__ == "__main__":
    main()
