"""``qolora plan`` for three MoE models on one 24 GiB GPU, from their published configs (no weights):
2048 tokens, batch 1, all-linear, r 8 and r 16. Prints BENCHMARKS.md's rows: the 4-bit weights, the
unquantized parameters, the adapters with their gradients and optimizer states, the totals, the
parameter counts (total and active per token), next to the figures others publish.

    python benchmarks/moe_plan.py
"""

from __future__ import annotations

from _common import row

from qolora.plan import GiB, plan

CONFIGS = {
    "Mixtral-8x7B": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, tie_word_embeddings=False,
    ),
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "gpt-oss-20b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
        tie_word_embeddings=False, sliding_window=128,
    ),
}  # fmt: skip

PUBLISHED = {
    "Mixtral-8x7B": "46.7B / 12.9B parameters (Mistral); about 26 GB of 4-bit weights (the issue)",
    "Qwen3-30B-A3B": "30.5B / 3.3B parameters (Qwen); Unsloth: 63 GB for 16-bit LoRA (as reported by promptsicle.com)",
    "gpt-oss-20b": "20.9B / 3.6B parameters without the input embedding (OpenAI); Unsloth: 12.8 GB (same source)",
}

WEIGHTS = "4-bit weights (incl. double-quant stats)"
UNQUANTIZED = "unquantized params (embeddings, norms, lm_head)"


def main() -> None:
    print(
        row(
            "model", "4-bit weights", "unquantized", "adapters + grads + optimizer (r 8)", "activations (r 8)",
            "total at r 8 / r 16", "fits 24 GiB", "parameters / active per token", "published elsewhere",
        )
    )  # fmt: skip
    print(row(*["---"] * 9))
    for name, cfg in CONFIGS.items():
        p8, p16 = (plan(cfg, 2048, 1, r, "24GiB") for r in (8, 16))
        c = p8.components
        train = sum(v for k, v in c.items() if k.startswith(("adapters", "adapter gradients", "optimizer")))
        acts = next(v for k, v in c.items() if k.startswith("activations"))
        fits = "at r 8 and r 16" if p16.fits else ("at r 8" if p8.fits else "no")
        moe = p8.moe
        print(
            row(
                name,
                f"{c[WEIGHTS] / GiB:.1f} GiB",
                f"{c[UNQUANTIZED] / GiB:.1f} GiB",
                f"{train / GiB:.1f} GiB",
                f"{acts / GiB:.1f} GiB",
                f"{p8.total_bytes / GiB:.1f} / {p16.total_bytes / GiB:.1f} GiB",
                fits,
                f"{moe.total / 1e9:.1f}B / {moe.active / 1e9:.1f}B" if moe else "-",
                PUBLISHED[name],
            )
        )


if __name__ == "__main__":
    main()
