"""MoE experts in 4-bit (``quant/experts.py``) against transformers' fused 16/32-bit experts: the
bytes the experts take, and the time of one forward and backward, side by side in one process.

A random Mixtral, or with ``--family gpt-oss`` a random gpt-oss (biased experts stored fused, clamped
SwiGLU, eager attention), of hidden 512, expert intermediate 1024, 4 layers, 8 experts, top 2, is
saved once.
Every variant trains LoRA on the attention projections (r 16) over 2 x 256 tokens:
- ``fused fp32``: transformers' model in fp32, experts fused and frozen (what loads without QOLoRA,
  in this CPU's fast dtype; on a GPU they would be bf16, half these bytes);
- ``4-bit experts``: QOLoRA's load, every expert matrix an NF4 layer, frozen;
- ``4-bit experts + LoRA on experts``: the same, with all-linear adapters (attention and every expert).
Medians of 5 steps after 2 warm-up steps, the variants interleaved; fp32 compute on the CPU.

    python benchmarks/moe.py [--family gpt-oss]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path("runs/moe-bench")
SHAPE = dict(
    vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
)  # fmt: skip
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {}),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", {"head_dim": 64}),
}


def model_dir(family: str) -> Path:
    import transformers

    d = ROOT / family / "model"
    if not (d / "config.json").is_file():
        config, model, extra = FAMILIES[family]
        torch.manual_seed(0)
        getattr(transformers, model)(getattr(transformers, config)(**SHAPE, **extra)).save_pretrained(d)
    return d


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the experts' weights as held: packed data and quant_state, or the fused tensors."""
    from qolora import quant

    total = 0
    for name, m in model.named_modules():
        if ".experts" not in name and not name.endswith("experts"):
            continue
        if quant.is_4bit(m):
            total += sum(t.numel() * t.element_size() for _, t in quant.weight_parts(m)[1])
        elif type(m).__name__.endswith("Experts"):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def variants(d: Path) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qolora import quant
    from qolora.adapters import resolved_targets

    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    out = {}
    fused = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    out["fused fp32 experts, LoRA on attention"] = get_peft_model(fused, LoraConfig(r=16, target_modules=attn))
    four = quant.load_quantized(d)
    out["4-bit experts, LoRA on attention"] = get_peft_model(four, LoraConfig(r=16, target_modules=attn))
    every = quant.load_quantized(d)
    cfg = resolved_targets(every, LoraConfig(r=16, target_modules="all-linear"))
    out["4-bit experts, LoRA on attention and every expert"] = get_peft_model(every, cfg)
    return out


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    family = ap.parse_args().family
    torch.manual_seed(0)
    models = variants(model_dir(family))
    ids = torch.randint(3, 1000, (2, 256), generator=torch.Generator().manual_seed(1))
    for m in models.values():
        m.train()
        for _ in range(2):
            step(m, ids)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(5):
        for k, m in models.items():
            times[k].append(step(m, ids))
    base = statistics.median(times["fused fp32 experts, LoRA on attention"])
    print(
        _common.row(
            "model", "variant", "expert weights MiB", "fwd+bwd ms (median of 5)", "vs fused fp32", "machine", "date"
        )
    )
    print(_common.row(*["---"] * 7))
    for k, m in models.items():
        med = statistics.median(times[k])
        print(
            _common.row(
                family,
                k,
                f"{expert_bytes(m) / 2**20:.1f}",
                f"{med * 1000:.0f}",
                f"{med / base:.2f}x",
                _common.machine(),
                _common.today(),
            )
        )


if __name__ == "__main__":
    main()
