"""Init time on Llama-2-7B-shaped layers: QOLoRA against PEFT's init_lora_weights (olora, pissa, pissa_niter_K).

Both run on the same random weights in one process, alternating A B A B, and the script
prints the median of each, their ratio, the factors' max difference, and its BENCHMARKS.md row.

    python benchmarks/init_speed.py [--layers 1] [--repeats 3] [--rank 16] [--quantized] [--init pissa]

--quantized puts the layers in 4-bit NF4 first: PEFT dequantizes and re-quantizes, QOLoRA
reads the original weights back from a safetensors file (its checkpoint source).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import qolora  # noqa: E402
from qolora import quant  # noqa: E402

# Llama-2-7B decoder layer: (out, in) of each projection
SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for name, (out, inp) in SHAPES.items():
            parent, leaf = name.split(".")
            setattr(getattr(self, parent), leaf, nn.Linear(inp, out, bias=False))


def build(n_layers: int, weights: dict[str, torch.Tensor], quantized: bool) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList()
    for i in range(n_layers):
        block = Block()
        for name in SHAPES:
            parent, leaf = name.split(".")
            lin = getattr(getattr(block, parent), leaf)
            lin.weight.data = weights[f"layers.{i}.{name}.weight"].clone()
            if quantized:
                settings = quant.QuantSettings("nf4", 64, True, torch.uint8, torch.float32)
                setattr(getattr(block, parent), leaf, quant.quantize_linear(lin, settings, torch.float32))
        model.layers.append(block)
    return model


def lora_config(r: int, init: str) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=r, target_modules=list({n.split(".")[1] for n in SHAPES}), init_lora_weights=init)


def factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n: (m.lora_B["default"].weight.detach(), m.lora_A["default"].weight.detach())
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (7 matrices each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quantized", action="store_true", help="4-bit NF4 base")
    ap.add_argument("--init", default="olora", help="PEFT's name: olora, pissa, pissa_niter_K (K > 0)")
    args = ap.parse_args()
    logging.getLogger("qolora").setLevel(logging.WARNING)
    torch.manual_seed(0)
    weights = {
        f"layers.{i}.{n}.weight": torch.randn(o, k) * 0.02 for i in range(args.layers) for n, (o, k) in SHAPES.items()
    }
    with tempfile.TemporaryDirectory() as ckpt:
        if args.quantized:
            save_file(weights, str(Path(ckpt) / "model.safetensors"))
        t_peft, t_ours = [], []
        for rep in range(args.repeats):
            m = build(args.layers, weights, args.quantized)
            t0 = time.perf_counter()
            peft_model = get_peft_model(m, lora_config(args.rank, args.init))
            t_peft.append(time.perf_counter() - t0)
            m = build(args.layers, weights, args.quantized)
            t0 = time.perf_counter()
            ours = qolora.get_qolora_model(
                m, lora_config(args.rank, args.init), progress=False, checkpoint=ckpt if args.quantized else None
            )
            t_ours.append(time.perf_counter() - t0)
            print(f"run {rep + 1}: peft {t_peft[-1]:.2f} s, qolora {t_ours[-1]:.2f} s", flush=True)
        fp, fo = factors(peft_model), factors(ours)
        report = ours.qolora_states["default"].report
    if args.quantized or "niter" in args.init:
        # PEFT factors the dequantized weight, we the original; randomized SVDs draw other sketches
        dB, dA = float("nan"), float("nan")
    else:
        dB = max(float((fp[k][0] - fo[k][0]).abs().max()) for k in fp)
        dA = max(float((fp[k][1] - fo[k][1]).abs().max()) for k in fp)
    tp, to = _common.median(t_peft), _common.median(t_ours)
    base = "4-bit NF4 (QOLoRA: checkpoint source)" if args.quantized else "fp32"
    print(
        f"PEFT {args.init} median {tp:.2f} s, QOLoRA median {to:.2f} s, speedup {tp / to:.1f}x; "
        f"max |dB| {dB:.2e}, max |dA| {dA:.2e}; mean rel_err/qlora_err {report.mean_ratio():.3f}"
    )
    print(
        _common.row(
            f"{args.init} init, {args.layers}x Llama-2-7B decoder layer (7 matrices), r={args.rank}, {base}",
            f"PEFT {tp:.2f} s",
            f"QOLoRA {to:.2f} s",
            f"**{tp / to:.1f}x**",
            f"median of {args.repeats}, A B A B; max abs diff B {dB:.1e}, A {dA:.1e}",
            f"`{_common.command()}`",
            _common.machine(),
            _common.today(),
        )
    )


if __name__ == "__main__":
    main()
