"""MoE experts loaded as one 4-bit linear layer per stored matrix (``qolora/quant/experts.py``)."""

from __future__ import annotations

import pytest
import torch
import transformers

from qolora import quant
from qolora.quant.experts import UnfusedExperts, stored_names

from .conftest import make_tokenizer
from .model_matrix import FAMILIES, build


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    tok = make_tokenizer()
    build(next(f for f in FAMILIES if f.name == "Mixtral"), tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_each_expert_layer_holds_nf4_of_its_checkpoint_matrix_and_no_fused_copy_is_made(
    mixtral_dir, monkeypatch
) -> None:
    fused = []
    init = transformers.models.mixtral.modeling_mixtral.MixtralExperts.__init__

    def record(self, *a, **k):
        init(self, *a, **k)
        fused.append(self)

    monkeypatch.setattr(transformers.models.mixtral.modeling_mixtral.MixtralExperts, "__init__", record)
    model = quant.load_quantized(mixtral_dir)
    assert fused and all(p.device.type == "meta" for m in fused for p in m.parameters())  # never materialized
    assert not [n for n, p in model.named_parameters() if p.ndim == 3]
    ckpt = quant.CheckpointWeights(mixtral_dir)
    experts = [(n, m) for n, m in model.named_modules() if ".experts." in n and quant.is_4bit(m)]
    assert len(experts) == 2 * 8 * 3
    for name, layer in experts[::7]:
        key = ckpt.find(name, ("model",))  # block_sparse_moe in the checkpoint, mlp in the model
        assert key is not None and ".block_sparse_moe." in key, name
        want = quant.roundtrip(ckpt.get(key), quant.quant_settings(layer))
        assert torch.equal(quant.dequantize(layer).float(), want.float()), name


def test_the_unfused_forward_is_the_fused_forward(mixtral_dir) -> None:
    """fp32, no quantization: the experts as separate matrices give transformers' fused output."""
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    fused = model.model.layers[0].mlp.experts
    names = stored_names(model)
    assert names == ("w1", "w3", "w2")
    unfused = UnfusedExperts(fused, names)
    i = fused.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        for e, expert in enumerate(unfused):
            expert.w1.weight.copy_(fused.gate_up_proj[e, :i])
            expert.w3.weight.copy_(fused.gate_up_proj[e, i:])
            expert.w2.weight.copy_(fused.down_proj[e])
        x = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
        idx = torch.randint(0, 8, (12, 2), generator=torch.Generator().manual_seed(2))
        w = torch.rand(12, 2, generator=torch.Generator().manual_seed(3))
        assert (unfused(x, idx, w) - fused(x, idx, w)).abs().max() < 1e-6
        unfused[3].w1.weight.mul_(2.0)  # negative control: a wrong expert shows
        assert (unfused(x, idx, w) - fused(x, idx, w)).abs().max() > 1e-3


def test_a_checkpoint_that_stores_its_experts_fused_loads_them_as_stored_and_says_so(
    mixtral_dir, tmp_path, caplog
) -> None:
    """No per-matrix keys to read into: the experts are not unfused (that would leave 4-bit layers
    with no weights), they load fused and 16-bit, and one warning names them with their memory."""
    import logging
    import shutil

    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    for f in mixtral_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, fused_dir / f.name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused_dir / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="qolora"):
        loaded = quant.load_quantized(fused_dir)
    assert not any(isinstance(m, UnfusedExperts) for m in loaded.modules())
    with torch.no_grad():  # the fused weights arrived, as stored
        assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj)
    lines = [r.getMessage() for r in caplog.records if "MoE experts modules stayed in 16 bits" in r.getMessage()]
    assert len(lines) == 1 and "the checkpoint stores them fused" in lines[0] and "layers.0.mlp.experts" in lines[0]


def test_all_linear_leaves_out_a_moe_routing_gate() -> None:
    """Qwen2-MoE's shared_expert_gate (hidden -> 1) routes; a rank-r adapter cannot fit it (r <= 1),
    and PEFT's all-linear would take it: QOLoRA leaves it out, and keeps every expert and projection."""
    from peft import LoraConfig

    from qolora.adapters import resolved_targets
    from qolora.quant.loading import meta_model

    cfg = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
    ).to_dict()  # fmt: skip
    model = meta_model(cfg)
    targets = resolved_targets(model, LoraConfig(r=4, target_modules="all-linear")).target_modules
    assert "model.layers.0.mlp.shared_expert_gate" not in targets
    assert "model.layers.0.mlp.shared_expert.up_proj" in targets and "model.layers.0.self_attn.q_proj" in targets
    named = resolved_targets(model, LoraConfig(r=1, target_modules=["shared_expert_gate"])).target_modules
    assert named == {"shared_expert_gate"}  # named explicitly, it is the user's choice
