"""Initial-model fidelity on the real demo model: weight error and logits KL against full precision.

Compares, on SmolLM2-135M-Instruct (all linear layers, r = alpha): plain QLoRA (the 4-bit model),
PEFT's init_lora_weights="olora" on the 4-bit base, and QOLoRA's inits with the checkpoint source:
olora (T = 1, 2, 4 rounds, and its dequantized fallback), pissa (exact and niter 4) and loftq
(T = 1, 4). Weight error: mean over target layers of ‖W − W_eff‖_F / ‖W‖_F with
W_eff = dequant(base) + s·B·A. KL: mean per token of KL(p_fp32 ‖ p_model) on held-out
chat-formatted examples. Init time: the init report's (load excluded), in one process, one after
another.

    python benchmarks/init_fidelity.py [--model demo/model] [--rows 32] [--rank 16] [--json FILE]
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
import _common  # noqa: E402

import qolora  # noqa: E402
from qolora import quant  # noqa: E402
from qolora.training.data import load_rows  # noqa: E402
from qolora.training.run import load_tokenizer  # noqa: E402
from qolora.training.tokenize import Collator, Encoder, head, take  # noqa: E402


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            base = m.get_base_layer()
            W = quant.dequantize(base) if quant.is_4bit(base) else base.weight.detach().float()
            B, A = m.lora_B["default"].weight.detach().float(), m.lora_A["default"].weight.detach().float()
            out[name.removeprefix("base_model.model.")] = W + m.scaling["default"] * (B @ A)
        elif quant.is_4bit(m) and ".base_layer" not in name:
            out[name] = quant.dequantize(m)
    return out


@torch.no_grad()
def logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.log_softmax(logits, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--data", default="demo/data/eval.jsonl")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.model)
    rows = load_rows(args.data)
    rows = head(rows, args.rows)
    batch = Collator(tok.pad_token_id)(take(Encoder(tok, 128).encode_rows(rows)))
    mask = batch["attention_mask"].bool()
    ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref_w = {n: p.detach().clone() for n, p in ref_model.named_parameters() if p.ndim == 2}
    ref_lp = logprobs(ref_model, batch)
    del ref_model
    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", init_lora_weights="olora")

    def ours(**kw):
        return lambda: qolora.get_qolora_model(quant.load_quantized(args.model), cfg, progress=False, **kw)

    variants = {
        "plain QLoRA (4-bit, no adapter)": lambda: quant.load_quantized(args.model),
        "PEFT olora on the 4-bit base": lambda: get_peft_model(quant.load_quantized(args.model), cfg),
        "QOLoRA olora, dequantized source (fallback)": ours(init_source="dequantized"),
        "QOLoRA olora (default)": ours(),
        "QOLoRA olora, T = 2": ours(init_iters=2),
        "QOLoRA olora, T = 4": ours(init_iters=4),
        "QOLoRA pissa (exact SVD)": ours(init="pissa"),
        "QOLoRA pissa, svd_niter 4": ours(init="pissa", svd_niter=4),
        "QOLoRA loftq, T = 1": ours(init="loftq"),
        "QOLoRA loftq, T = 4": ours(init="loftq", init_iters=4),
    }
    results = {}
    for label, make in variants.items():
        t0 = time.perf_counter()
        model = make()
        wall = time.perf_counter() - t0
        states = getattr(model, "qolora_states", None)
        init_s = states["default"].report.seconds if states else None
        eff = effective_weights(model)
        errs = [float((ref_w[f"{n}.weight"] - W).norm() / ref_w[f"{n}.weight"].norm()) for n, W in eff.items()]
        lp = logprobs(model, batch)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)[mask].mean().item()
        results[label] = (sum(errs) / len(errs), kl, len(errs), init_s, wall)
        print(
            f"{label}: mean rel weight error {results[label][0]:.5f} over {len(errs)} layers, KL {kl:.5f}, "
            f"init {init_s if init_s is None else round(init_s, 2)} s, load + init {wall:.1f} s",
            flush=True,
        )
        del model
    q_err, q_kl = results["plain QLoRA (4-bit, no adapter)"][:2]
    print(
        f"| init (r = {args.rank}) | mean rel weight error | vs plain QLoRA | logits KL vs fp32 (per token) "
        "| vs plain QLoRA | init time | command | machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (err, kl, _, init_s, _) in results.items():
        print(
            _common.row(
                label,
                f"{err:.5f}",
                f"{err / q_err:.3f}x",
                f"{kl:.5f}",
                f"{kl / q_kl:.3f}x",
                "n/a" if init_s is None else f"{init_s:.1f} s",
                f"`{_common.command()}`",
                _common.machine(),
                _common.today(),
            )
        )
    if args.json:
        keys = ("weight_error", "kl", "layers", "init_seconds", "load_and_init_seconds")
        payload = {
            "rank": args.rank,
            "rows": args.rows,
            "machine": _common.machine(),
            "date": _common.today(),
            "results": {k: dict(zip(keys, v)) for k, v in results.items()},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
