"""`qolora plan --gpus N [--fsdp] [--offload]`: predicted memory per GPU for 7B and 70B Llamas on
several 24 GB GPUs, beside PEFT's documented FSDP-QLoRA figures (70B on 2x24 GB: 19.6 GB per
GPU with CPU offload, 35.6 GB without; seq 2048, batch 2 per GPU, r 8 all-linear, AdamW,
gradient checkpointing, flash attention, bf16; docs/source/accelerate/fsdp.md in PEFT).

Predictions only: no GPU has run these (the FSDP shard sizes are measured on 2 CPU ranks in
tests/test_distributed.py). Writes benchmarks/results/plan_gpus.json and prints the rows.

    python benchmarks/plan_gpus.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from qolora.plan import GiB, plan  # noqa: E402

LLAMA = {"num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}
L70 = LLAMA | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80}
L70 |= {"num_attention_heads": 64, "num_key_value_heads": 8}
MODELS = {
    "Llama-2-7B": LLAMA
    | {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000},
    "Llama-2-70B": L70 | {"vocab_size": 32000},
    "Llama-3-70B": L70 | {"vocab_size": 128256},
}
DEFAULTS = {"seq_len": 2048, "batch": 1, "rank": 16}  # QOLoRA's recipe: paged AdamW 8-bit, chunked CE
PEFT_RECIPE = {"seq_len": 2048, "batch": 2, "rank": 8, "optimizer": "adamw_torch", "chunked_ce": False}
PEFT_FIGURES_GB = {True: 19.6, False: 35.6}  # offload -> GB per GPU, as PEFT's docs report them


def one(model: str, gpus: int, fsdp: bool, offload: bool, recipe: dict) -> dict:
    r = dict(recipe)
    seq, batch, rank = r.pop("seq_len"), r.pop("batch"), r.pop("rank")
    p = plan(MODELS[model], seq, batch, rank, "24GiB", gpus=gpus, fsdp=fsdp, fsdp_offload=offload, **r)
    return {
        "model": model,
        "gpus": gpus,
        "mode": p.mode,
        "recipe": recipe,
        "per_gpu_bytes": p.total_bytes,
        "cpu_bytes_per_process": p.to_json()["cpu_bytes"],
        "fits_24GiB": p.fits,
        "max_seq_len": p.max_seq_len,
    }


def main() -> None:
    cases = [("Llama-2-7B", 1, False, False), ("Llama-2-7B", 2, False, False), ("Llama-2-7B", 2, True, False)]
    cases += [(m, n, True, off) for m in ("Llama-2-70B", "Llama-3-70B") for n in (2, 4) for off in (False, True)]
    results = [one(*c, DEFAULTS) for c in cases]
    peft = [one("Llama-2-70B", 2, True, off, PEFT_RECIPE) for off in (False, True)]
    out = Path(__file__).parent / "results" / "plan_gpus.json"
    out.write_text(
        json.dumps({"qolora_recipe": results, "peft_recipe": peft, "peft_figures_gb": PEFT_FIGURES_GB}, indent=1)
    )
    rows = []
    for r in results:
        rows.append(
            _common.row(
                f"{r['model']}, {r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}, {r['mode']}",
                "seq 2048, batch 1/GPU, r 16, paged AdamW 8-bit, chunked CE",
                f"**{r['per_gpu_bytes'] / GiB:.1f} GiB**/GPU",
                f"{r['cpu_bytes_per_process'] / GiB:.1f} GiB CPU/process" if r["cpu_bytes_per_process"] else "-",
                f"{'fits' if r['fits_24GiB'] else 'does not fit'} 24 GiB; max seq {r['max_seq_len']}",
                "-",
                f"`{_common.command()}`",
                _common.today(),
            )
        )
    for r in peft:
        off = r["mode"] == "fsdp+offload"
        rows.append(
            _common.row(
                f"{r['model']}, 2 GPUs, {r['mode']} (PEFT's recipe)",
                "seq 2048, batch 2/GPU, r 8, AdamW, full-logits CE",
                f"**{r['per_gpu_bytes'] / GiB:.1f} GiB**/GPU",
                f"{r['cpu_bytes_per_process'] / GiB:.1f} GiB CPU/process" if r["cpu_bytes_per_process"] else "-",
                f"{'fits' if r['fits_24GiB'] else 'does not fit'} 24 GiB; max seq {r['max_seq_len']}",
                f"PEFT measured {PEFT_FIGURES_GB[off]} GB/GPU",
                f"`{_common.command()}`",
                _common.today(),
            )
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
