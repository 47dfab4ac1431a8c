"""Padded, length-grouped and packed batches on the demo: padding fraction and real tokens per second.

    python benchmarks/packing.py [--steps 10] [--modes padded,grouped,packed]

Trains examples/sft/demo.yaml (OLoRA r16, 4-bit, chatterbot) for --steps steps three ways: padded batches
of 8 (today's default), batches of 8 grouped by length (data.group_by_length), and padding-free packs
(data.packing: 8 packs of up to max_length = 128 tokens per step, laid out as one row). It counts,
in every batch a training step uses, the positions that are padding, and times the steps (first step
left out: warm-up). Prints the BENCHMARKS.md rows and writes benchmarks/results/packing-<modes>.json.
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

MODES = {
    "padded": ["train.batch_size=8"],
    "grouped": ["train.batch_size=8", "data.group_by_length=true"],
    "packed": ["train.batch_size=8", "data.packing=true"],
}


class Timer(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        self.ends.append(time.perf_counter())


def measure(mode: str, steps: int) -> dict:
    from qolora.training.trainer import QoloraTrainer

    counts: dict[str, list[int]] = {"positions": [], "real": []}
    real_step = QoloraTrainer.training_step

    def counting(self, model, inputs, *a, **k):  # noqa: ANN001 - the batches training really uses
        mask = inputs.get("attention_mask")
        n = inputs["input_ids"].numel()
        counts["positions"].append(n)
        counts["real"].append(int(mask.sum()) if mask is not None else n)
        return real_step(self, model, inputs, *a, **k)

    timer = Timer()
    build = run.build_trainer

    def build_with_timer(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(timer)
        return trainer

    QoloraTrainer.training_step = counting
    run.build_trainer = build_with_timer
    try:
        out = Path("runs/packing") / mode
        cfg = load_config(
            "examples/sft/demo.yaml",
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
        QoloraTrainer.training_step = real_step
        run.build_trainer = build
    pos, real = counts["positions"], counts["real"]
    assert len(pos) == steps, (len(pos), steps)  # one batch per step (grad_accum 1)
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
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    res = {m: measure(m, args.steps) for m in args.modes.split(",")}
    write_json_atomic(Path(f"benchmarks/results/packing-{args.modes.replace(',', '-')}.json"), res)
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
