"""7B/8B on a 24 GB GPU: peak memory and tokens/s of QOLoRA training, against PEFT + QLoRA.

Builds Llama-2-7B- and Llama-3-8B-shaped models with random weights directly in 4-bit, one
matrix at a time (no 13 GB fp16 copy, no download), runs the QOLoRA init, then training steps
(gradient checkpointing, chunked CE, paged AdamW 8-bit) at seq 2048 and at the longest
sequence that fits, under `torch.cuda.set_per_process_memory_fraction` emulating 24 GiB. The
baseline is PEFT's LoRA on the same 4-bit model with the standard full-logits loss. It prints
`qolora plan`'s prediction next to each measured peak.

    python benchmarks/gpu_7b.py [--shapes 7b,8b] [--steps 3] [--gpu-memory 24GiB]
    python benchmarks/gpu_7b.py --shapes tiny --device cpu --steps 2     # smoke test of the code path
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from qolora import quant  # noqa: E402
from qolora.plan import GiB, Shape, components, gpu_total, parse_bytes  # noqa: E402
from qolora.training.losses import chunked_ce_sum  # noqa: E402

SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}


def build_4bit(shape: dict, device: str, dtype: torch.dtype) -> nn.Module:
    """A random Llama in 4-bit NF4 (double quant), built on the meta device and filled matrix by matrix."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**shape, max_position_embeddings=131072, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    settings = quant.QuantSettings("nf4", 64, True, torch.uint8, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    W = torch.randn(lin.out_features, lin.in_features, device=device, dtype=dtype, generator=g) * 0.02
                    setattr(parent, name, quant.linear4bit(W, settings, dtype))
                    del W
    for mod_name, mod in model.named_modules():
        for p_name, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                init = (
                    torch.ones
                    if "norm" in p_name or "norm" in mod_name
                    else (lambda *s, **k: torch.randn(*s, **k, generator=g) * 0.02)
                )
                setattr(mod, p_name, nn.Parameter(init(*p.shape, device=device, dtype=dtype), requires_grad=False))
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(device)  # its buffers were built on meta
    model.config.use_cache = False
    return model


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_steps(model: nn.Module, seq: int, steps: int, device: str, chunked: bool) -> tuple[int, float]:
    """Peak bytes and tokens/s of ``steps`` steps at batch 1 (first step excluded from speed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        __import__("bitsandbytes").optim.PagedAdamW8bit(params, lr=1e-4)
        if device == "cuda"
        else torch.optim.AdamW(params, lr=1e-4)
    )
    lm = model.base_model.model
    vocab = lm.config.vocab_size
    reset(device)
    t0 = None
    for step in range(steps):
        if step == 1:
            torch.cuda.synchronize() if device == "cuda" else None
            t0 = time.perf_counter()
        x = torch.randint(0, vocab, (1, seq), device=device)
        if chunked:
            hidden = lm.model(input_ids=x).last_hidden_state
            loss = chunked_ce_sum(hidden[0, :-1], lm.lm_head.weight, x[0, 1:]) / (seq - 1)
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0 if t0 else float("nan")
    return peak(device), (steps - 1) * seq / dt if steps > 1 else float("nan")


def fits(model: nn.Module, seq: int, device: str, chunked: bool) -> bool:
    try:
        train_steps(model, seq, 1, device, chunked)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        reset(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="7b,8b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gpu-memory", default="24GiB")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    import qolora

    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    if device == "cuda":
        budget = parse_bytes(args.gpu_memory)
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(0).total_memory))
    rows = []
    for name in args.shapes.split(","):
        cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", init_lora_weights="olora")
        results = {}
        for kind in ("qolora", "peft"):
            base = build_4bit(SHAPES[name], device, dtype)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
            t0 = time.perf_counter()
            if kind == "qolora":
                model = qolora.get_qolora_model(base, cfg, init_source="dequantized", progress=False)
            else:
                model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear"))
            init_s = time.perf_counter() - t0
            mem, tps = train_steps(model, args.seq, args.steps, device, chunked=kind == "qolora")
            lo, hi = args.seq, args.seq
            if device == "cuda":
                while fits(model, hi * 2, device, kind == "qolora") and hi < 262144:
                    lo, hi = hi * 2, hi * 2
                hi = hi * 2
                while hi - lo > 1024:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if fits(model, mid, device, kind == "qolora") else (lo, mid)
            results[kind] = (init_s, mem, tps, lo)
            del model, base
            reset(device)
        s = Shape.from_config(SHAPES[name] | {"tie_word_embeddings": False})
        predicted = (
            gpu_total(components(s, args.seq, 1, args.rank))
            - components(s, 1, 1, 1)["CUDA context and allocator overhead"]
        )
        q, p = results["qolora"], results["peft"]
        print(
            f"{name}: qolora init {q[0]:.1f} s, peak {q[1] / GiB:.2f} GiB (plan {predicted / GiB:.2f}), "
            f"{q[2]:.0f} tok/s, max seq {q[3]}; peft peak {p[1] / GiB:.2f} GiB, {p[2]:.0f} tok/s, max seq {p[3]}",
            flush=True,
        )
        rows.append(
            _common.row(
                f"{name} 4-bit, r={args.rank}, seq {args.seq}, batch 1, {device}",
                f"peak {q[1] / GiB:.2f} GiB (plan {predicted / GiB:.2f})",
                f"{q[2]:.0f} tok/s",
                f"max seq {q[3]}",
                f"PEFT+QLoRA peak {p[1] / GiB:.2f} GiB, {p[2]:.0f} tok/s, max seq {p[3]}",
                f"`{_common.command()}`",
                _common.machine(),
                _common.today(),
            )
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
