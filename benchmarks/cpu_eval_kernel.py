"""What bitsandbytes' packed AVX512-BF16 CPU eval path was worth, and what it cost in exactness.

QOLoRA switches that path off (qolora/quant/layout.py). This measures, on the demo model
(SmolLM2-135M-Instruct, 4-bit NF4, fp32 compute, OLoRA r16) and the demo's held-out batches:
eval time per batch with the standard layout and with the packed layout, interleaved A B A B;
the eval loss both ways; and how far one eval pass plus one ``state_dict()`` moves the
dequantized base in the packed case.

    python benchmarks/cpu_eval_kernel.py [--model demo/model] [--data demo/data/eval.jsonl] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, median, row, today  # noqa: E402

from qolora import get_qolora_model, quant  # noqa: E402
from qolora.training.data import load_rows  # noqa: E402
from qolora.training.run import load_tokenizer  # noqa: E402
from qolora.training.tokenize import IGNORE, Collator, Encoder, head, take  # noqa: E402


def build(model_dir: str, packed: bool) -> torch.nn.Module:
    from peft import LoraConfig

    cfg = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights="olora")
    model = get_qolora_model(quant.load_quantized(model_dir, compute_dtype="float32"), cfg, progress=False)
    for m in model.modules():
        if quant.is_4bit(m):
            m.support_avx512bf16_for_cpu = packed  # True: bitsandbytes' own default on this CPU
    return model.eval()


@torch.no_grad()
def eval_pass(model: torch.nn.Module, batches: list[dict]) -> tuple[list[float], float]:
    """Seconds per batch and the token-weighted loss."""
    times, total, count = [], 0.0, 0
    for b in batches:
        t0 = time.perf_counter()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        times.append(time.perf_counter() - t0)
        labels = b["labels"][:, 1:]
        total += float(
            F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
        )
        count += int((labels != IGNORE).sum())
    return times, total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--data", default="demo/data/eval.jsonl")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cpu_eval_kernel.json")
    args = ap.parse_args()
    if not quant.cpu_packing_available():
        print("bitsandbytes reports no AVX512-BF16 on this CPU: its packed eval path does not exist here")
        return
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    rows = load_rows(args.data, "auto", False)
    rows = head(rows, args.rows)
    examples = take(Encoder(tok, 128, "auto", True).encode_rows(rows))
    collate = Collator(tok.pad_token_id)
    batches = [collate(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    std, packed = build(args.model, False), build(args.model, True)
    layer = next(m for m in packed.modules() if quant.is_4bit(m))
    w0 = quant.dequantize(layer)
    runs: dict[str, list[float]] = {"standard": [], "packed": []}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):  # A B A B; the first packed pass includes the one-time repacking
        for name, model in (("standard", std), ("packed", packed)):
            times, loss = eval_pass(model, batches)
            runs[name].append(sum(times) / len(times))
            losses[name] = loss
    packed.state_dict()  # bitsandbytes converts the layout back here, re-quantizing absmax
    drift = float((quant.dequantize(layer) - w0).abs().max() / w0.abs().max())
    med = {k: median(v[1:] if len(v) > 1 else v) for k, v in runs.items()}  # first pass: warm-up
    result = {
        "machine": machine(),
        "date": today(),
        "command": command(),
        "batches": len(batches),
        "batch_size": args.batch_size,
        "seconds_per_batch": runs,
        "median_s_per_batch": med,
        "speedup_packed": med["standard"] / med["packed"],
        "eval_loss": losses,
        "packed_base_drift_max_rel": drift,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        row(
            f"eval forward, SmolLM2-135M 4-bit NF4, fp32 compute, OLoRA r16, {len(batches)} batches of "
            f"{args.batch_size} (<= 128 tokens)",
            f"standard {med['standard']:.3f} s/batch",
            f"packed {med['packed']:.3f} s/batch",
            f"**{result['speedup_packed']:.2f}x**",
            f"median of {args.repeats - 1} passes after warm-up, A B A B; eval loss {losses['standard']:.4f} "
            f"standard vs {losses['packed']:.4f} packed; packed base moved {drift:.1e} (max rel) after one "
            "state_dict()",
            f"`{command()}`",
            machine(),
            today(),
        )
    )


if __name__ == "__main__":
    main()
