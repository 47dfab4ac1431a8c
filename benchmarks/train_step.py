"""Train-step time: QOLoRA's pipeline against the PEFT + transformers Trainer QLoRA baseline.

Same model (the demo's SmolLM2-135M-Instruct, 4-bit NF4), same batches, same LoRA shape
(r=16, all linear layers), same optimizer (AdamW), gradient checkpointing on for both. Runs
alternate A B A B in fresh processes; each reports the median seconds per optimizer step
after one warm-up step.

    python benchmarks/train_step.py [--repeats 3] [--steps 6] [--batch 8]
    python benchmarks/train_step.py --bf16 [--steps 3] [--batch 2]   # defaults vs a bf16 recipe on CPU

--bf16 compares QOLoRA's defaults (compute dtype "auto" = fp32 on CPU) against the baseline
with the common QLoRA recipe's bf16 compute dtype and bf16 model dtype.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

WORKER = r"""
import json, statistics, sys, time, torch
from transformers import Trainer, TrainingArguments, TrainerCallback
kind, model_dir, steps, batch, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
chunked = sys.argv[6] == "1"
from qolora.config import config_from_dict
from qolora.training.run import load_tokenizer, prepare_data, load_base, lora_config
from qolora.training.tokenize import Collator
cfg = config_from_dict({"model": model_dir, "quant": {"compute_dtype": dtype},
                        "adapter": {"r": 16, "alpha": 16, "init": "olora" if kind == "qolora" else "lora"},
                        "data": {"train": "demo/data/train.jsonl", "eval": "demo/data/eval.jsonl", "max_length": 128,
                                 "max_train_rows": steps * batch, "max_eval_rows": 1},
                        "train": {"output_dir": "/tmp/qolora-train-step-" + kind, "max_steps": steps,
                                  "batch_size": batch, "optimizer": "adamw_torch", "chunked_ce": chunked,
                                  "save_steps": 10**6, "eval_steps": 10**6, "logging_steps": 10**6}})
tok = load_tokenizer(model_dir)
train_ex, _, _ = prepare_data(cfg, tok)
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
if kind == "qolora":
    from qolora import get_qolora_model
    from qolora.training.trainer import build_trainer, prepare_for_training_
    base = load_base(cfg)
    prepare_for_training_(base, True)
    model = get_qolora_model(base, lora_config(cfg), progress=False)
    trainer = build_trainer(model, tok, train_ex, None, cfg)
else:  # the PEFT + Trainer QLoRA recipe
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dt))
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir="/tmp/qolora-train-step-peft", max_steps=steps,
                             per_device_train_batch_size=batch, learning_rate=2e-4, optim="adamw_torch",
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                             use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, bf16=dtype == "bfloat16")
    trainer = Trainer(model=m, args=args, train_dataset=train_ex, data_collator=Collator(tok.pad_token_id))
trainer.add_callback(Clock())
trainer.train()
print(json.dumps({"median_step_s": statistics.median(times[1:]), "steps": len(times)}))
"""


def run(kind: str, model: str, steps: int, batch: int, dtype: str, chunked: bool = True) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, kind, model, str(steps), str(batch), dtype, str(int(chunked))],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["median_step_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="baseline with bf16 compute and model dtype")
    ap.add_argument("--no-chunked-ce", action="store_true", help="QOLoRA with the plain full-logits loss")
    args = ap.parse_args()
    base_dtype = "bfloat16" if args.bf16 else "float32"
    ours, base = [], []
    for rep in range(args.repeats):
        ours.append(run("qolora", args.model, args.steps, args.batch, "auto", not args.no_chunked_ce))
        base.append(run("peft", args.model, args.steps, args.batch, base_dtype))
        print(
            f"run {rep + 1}: qolora {ours[-1]:.2f} s/step, PEFT+Trainer ({base_dtype}) {base[-1]:.2f} s/step",
            flush=True,
        )
    o, b = _common.median(ours), _common.median(base)
    what = (
        "QOLoRA defaults (auto = fp32 on CPU) vs PEFT+Trainer QLoRA with bf16 compute"
        if args.bf16
        else "QOLoRA vs PEFT+Trainer QLoRA, same settings (fp32 compute)"
    )
    if args.no_chunked_ce:
        what += ", QOLoRA without chunked CE"
    print(
        _common.row(
            f"{what}; SmolLM2-135M 4-bit, r=16 all-linear, batch {args.batch}, max_len 128, grad ckpt",
            f"QOLoRA {o:.2f} s/step",
            f"baseline {b:.2f} s/step",
            f"**{b / o:.2f}x**",
            f"median step of {args.steps - 1} after warm-up, median of {args.repeats} runs, A B A B",
            f"`{_common.command()}`",
            _common.machine(),
            _common.today(),
        )
    )


if __name__ == "__main__":
    main()
