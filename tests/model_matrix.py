"""The architecture matrix: a tiny random model of each family users bring, and what QOLoRA does
with it (``tests/test_models.py`` runs every family through init, the loss check, training, reload,
the merged export, GGUF and generate). The README's "Supported models" table is ``supported_table()``.

Every quantized linear is a multiple of 64 in and 32 out (bitsandbytes' CPU kernels need it):
hidden 64, 4 heads of 16, 2 KV heads, MLP 128, 2 layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
KV = {"num_key_value_heads": 2}


@dataclass(frozen=True)
class Family:
    """One architecture family: its config class (in ``transformers``), model class and settings.

    ``spm``: llama.cpp's converter reads this family's vocabulary from a sentencepiece
    ``tokenizer.model`` (as the real checkpoints ship one), so the test model gets one.
    """

    name: str
    config: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    spm: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("Llama", "LlamaConfig", "LlamaForCausalLM", {**SHAPE, **KV}),
    Family("Mistral", "MistralConfig", "MistralForCausalLM", {**SHAPE, **KV}),
    Family("Qwen2", "Qwen2Config", "Qwen2ForCausalLM", {**SHAPE, **KV}),
    Family("Qwen3", "Qwen3Config", "Qwen3ForCausalLM", {**SHAPE, **KV, "head_dim": 16}),
    Family("Gemma2", "Gemma2Config", "Gemma2ForCausalLM", {**SHAPE, **KV, "head_dim": 16}, spm=True),
    Family("Gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", {**SHAPE, **KV, "head_dim": 16}),
    Family("Phi3", "Phi3Config", "Phi3ForCausalLM", {**SHAPE, **KV}, note="fused qkv_proj, gate_up_proj", spm=True),
    Family("Phi-2", "PhiConfig", "PhiForCausalLM", {**SHAPE, **KV}),
    Family("OLMo2", "Olmo2Config", "Olmo2ForCausalLM", {**SHAPE, **KV}),
    Family("SmolLM3", "SmolLM3Config", "SmolLM3ForCausalLM", {**SHAPE, **KV}),
    Family("StableLM", "StableLmConfig", "StableLmForCausalLM", {**SHAPE, **KV}),
    Family("Starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", {**SHAPE, **KV}),
    Family("Cohere", "CohereConfig", "CohereForCausalLM", {**SHAPE, **KV}),
    Family("Granite", "GraniteConfig", "GraniteForCausalLM", {**SHAPE, **KV, "logits_scaling": 8.0}),
    Family(
        "Mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        {**SHAPE, **KV, "num_local_experts": 8, "num_experts_per_tok": 2},
        note="MoE, 8 experts: each expert matrix 4-bit and adapted",
    ),
    Family(
        "Qwen3-MoE",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**SHAPE, **KV, "head_dim": 16, "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 64},
        note="MoE, 32 experts: each expert matrix 4-bit and adapted",
    ),
    Family(
        "gpt-oss",
        "GptOssConfig",
        "GptOssForCausalLM",
        {**SHAPE, **KV, "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2},
        note="MoE, 8 biased experts stored fused: each expert matrix 4-bit and adapted, exported fused",
    ),
    Family(
        "GPT-2",
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 64, "n_layer": 2, "n_head": 4},
        note="Conv1D (fan_in_fan_out)",
    ),
    Family("GPT-NeoX", "GPTNeoXConfig", "GPTNeoXForCausalLM", SHAPE | {"intermediate_size": 256}),
    Family(
        "Falcon",
        "FalconConfig",
        "FalconForCausalLM",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        note="FalconLinear (an nn.Linear subclass) made 4-bit; multi-query",
    ),
)


def config(family: Family, vocab_size: int = 384, bos: int = 1, eos: int = 2, pad: int = 0) -> Any:
    """The family's tiny config (``transformers.<family.config>``)."""
    import transformers

    cls = getattr(transformers, family.config)
    return cls(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **family.kwargs)


def build(family: Family, tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """The family's tiny random model, sized to ``tokenizer``, in fp32."""
    import transformers

    t = tokenizer
    cfg = config(family, len(t), t.bos_token_id, t.eos_token_id, t.pad_token_id)
    torch.manual_seed(seed)
    return getattr(transformers, family.model)(cfg).float()


def loss_path(family: Family) -> str:
    """How ``qolora train`` takes this family's loss: the chunked CE (with the logit transform its
    config declares) or the model's own full logits (a head the chunked CE cannot run)."""
    import transformers
    from accelerate import init_empty_weights

    from qolora.training.losses import logit_transform, supports_chunked_ce

    with init_empty_weights():
        lm = getattr(transformers, family.model)(config(family))
    if not supports_chunked_ce(lm):
        return "full logits"
    tf = logit_transform(lm)
    parts = [f"x{tf.scale:g}" if tf.scale != 1.0 else "", f"soft-cap {tf.softcap:g}" if tf.softcap else ""]
    extra = ", ".join(p for p in parts if p)
    return "chunked CE" + (f" ({extra})" if extra else "")


STEPS = "4-bit load, init, loss check, train, reload, merged, GGUF, generate"


def supported_table() -> str:
    """The README's "Supported models" table: one row per family of the matrix, each of which
    ``tests/test_models.py`` takes through every step of ``STEPS``."""
    rows = ["| family | transformers class | passes | loss | notes |", "|---|---|---|---|---|"]
    for f in FAMILIES:
        rows.append(f"| {f.name} | `{f.model}` | all {len(STEPS.split(', '))} steps | {loss_path(f)} | {f.note} |")
    return "\n".join(rows)
