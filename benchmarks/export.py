"""Merged-export memory and speed on synthetic Llama-shaped checkpoints (random bf16 weights).

For each size it writes a checkpoint and a trained-looking OLoRA adapter dir (r=16, 4-bit NF4
base recorded, checkpoint source), then alternates, A B A B: a plain copy of the checkpoint's
bytes, and `qolora export merged` in a fresh process (its own peak RSS). It prints peak RSS
per size: the sizes share one width and grow in depth, so a flat peak shows that memory does
not grow with the model (it grows with the largest tensor and the shard size) and export throughput as a
ratio to the plain copy.

    python benchmarks/export.py [--sizes 330m,540m,950m] [--repeats 3] [--mode trained] [--shard-mb 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

SIZES = {  # hidden, intermediate, layers (vocab 32000, Llama shapes): same width, growing depth
    "330m": (2048, 5632, 4),
    "540m": (2048, 5632, 8),
    "950m": (2048, 5632, 16),
}
VOCAB, R = 32000, 16
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(h: int, inter: int) -> dict[str, tuple[int, int]]:
    return {
        "q_proj": (h, h),
        "k_proj": (h, h),
        "v_proj": (h, h),
        "o_proj": (h, h),
        "gate_proj": (inter, h),
        "up_proj": (inter, h),
        "down_proj": (h, inter),
    }


def make_checkpoint(folder: Path, h: int, inter: int, layers: int) -> int:
    """Write config.json and one safetensors shard per decoder layer; return the parameter count."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=h // 64,
        num_key_value_heads=h // 64,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    weight_map, n = {}, 0

    def emit(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal n
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        n += sum(t.numel() for t in tensors.values())

    emit(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": (torch.randn(VOCAB, h, generator=g) * 0.02).bfloat16(),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            "lm_head.weight": (torch.randn(VOCAB, h, generator=g) * 0.02).bfloat16(),
        },
    )
    for i in range(layers):
        t = {
            f"model.layers.{i}.{'mlp' if p in PROJ[4:] else 'self_attn'}.{p}.weight": (
                torch.randn(*s, generator=g) * 0.02
            ).bfloat16()
            for p, s in shapes(h, inter).items()
        }
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        emit(f"layer{i:03d}.safetensors", t)
    index = {"metadata": {"total_size": 2 * n}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return n


def make_adapter(adapter: Path, ckpt: Path, h: int, inter: int, layers: int) -> None:
    """A trained-looking OLoRA adapter dir: B0, A0 from the real weights, B, A perturbed."""
    from peft import LoraConfig

    from qolora import quant
    from qolora.adapter_dir import AdapterMeta
    from qolora.files import FACTORS_FILE
    from qolora.olora import olora_factors

    src = quant.CheckpointWeights(ckpt)
    adapter.mkdir(parents=True)
    weights, factors, names = {}, {}, []
    for i in range(layers):
        for p in PROJ:
            name = f"model.layers.{i}.{'mlp' if p in PROJ[4:] else 'self_attn'}.{p}"
            B0, A0 = olora_factors(src.get(f"{name}.weight"), R)
            factors[f"{name}.B0"], factors[f"{name}.A0"] = B0, A0
            weights[f"base_model.model.{name}.lora_B.weight"] = B0 + 0.01 * torch.randn_like(B0)
            weights[f"base_model.model.{name}.lora_A.weight"] = A0 + 0.01 * torch.randn_like(A0)
            names.append(name)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    save_file(factors, str(adapter / FACTORS_FILE))
    LoraConfig(r=R, lora_alpha=R, target_modules=list(PROJ), init_lora_weights="olora").save_pretrained(adapter)
    q = quant.QuantSettings("nf4", 64, True, torch.uint8, torch.bfloat16).to_dict()
    AdapterMeta(
        init="olora",
        init_source="auto",
        layer_sources={n: "checkpoint" for n in names},
        base_model=str(ckpt),
        checkpoint=str(ckpt),
        fingerprint=quant.fingerprint(ckpt, progress=False),
        quant={**q, "compute_dtype": "bfloat16", "device": "cpu"},
        dtype="bfloat16",
        quantized_modules=names,
    ).write(adapter)


EXPORT = (
    "import json, sys; from qolora.export import export_merged; "
    "r = export_merged(sys.argv[1], sys.argv[2], mode=sys.argv[3], max_shard_bytes=int(sys.argv[4]), "
    "overwrite=True, progress=False); print(json.dumps({'s': r.seconds, 'rss': r.peak_rss_bytes, "
    "'bytes': r.bytes_written}))"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="330m,540m,950m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=["trained", "original"], default="trained")
    ap.add_argument("--shard-mb", type=int, default=256)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for size in args.sizes.split(","):
            h, inter, layers = SIZES[size]
            ckpt, adapter, out, copy = tmp / f"{size}-base", tmp / f"{size}-adapter", tmp / f"{size}-out", tmp / "copy"
            ckpt.mkdir()
            n = make_checkpoint(ckpt, h, inter, layers)
            make_adapter(adapter, ckpt, h, inter, layers)
            t_copy, t_exp, rss = [], [], []
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                shutil.copytree(ckpt, copy)
                t_copy.append(time.perf_counter() - t0)
                shutil.rmtree(copy)
                res = subprocess.run(
                    [sys.executable, "-c", EXPORT, str(adapter), str(out), args.mode, str(args.shard_mb << 20)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(res.stdout.strip().splitlines()[-1])
                t_exp.append(r["s"])
                rss.append(r["rss"])
                print(
                    f"{size} run {rep + 1}: copy {t_copy[-1]:.2f} s, export {r['s']:.2f} s, "
                    f"peak RSS {r['rss'] / 2**20:.0f} MiB",
                    flush=True,
                )
            tc, te = _common.median(t_copy), _common.median(t_exp)
            rows.append(
                _common.row(
                    f"merged export `{args.mode}`, {size} Llama-shaped ({n / 1e6:.0f}M params, bf16 in, fp16 out), "
                    f"{args.shard_mb} MiB shards",
                    f"peak RSS {max(rss) / 2**20:.0f} MiB",
                    f"export {te:.1f} s",
                    f"plain copy {tc:.2f} s",
                    f"**{tc / te:.3f}x** copy throughput",
                    f"median of {args.repeats}, A B A B",
                    f"`{_common.command()}`",
                    _common.machine(),
                    _common.today(),
                )
            )
            for p in (ckpt, adapter, out):
                shutil.rmtree(p, ignore_errors=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
