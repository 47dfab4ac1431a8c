"""MoE experts loaded as one 4-bit linear layer per stored matrix (``qolora/quant/experts.py``)."""

from __future__ import annotations

import pytest
import torch
import transformers

from qolora import quant
from qolora.quant.experts import UnfusedExperts, names_for_type, stored_names

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


@pytest.fixture(scope="module")
def fused_mixtral_dir(mixtral_dir, tmp_path_factory):
    """The tiny Mixtral as transformers 5 saves it: experts fused (gate_up_proj: E x 2I x H, gate rows
    first; down_proj), no per-matrix keys."""
    import shutil

    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    d = tmp_path_factory.mktemp("fused_mixtral")
    for f in mixtral_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


def test_experts_stored_fused_the_transformers_5_way_load_per_matrix_and_export_fused(fused_mixtral_dir) -> None:
    """A Mixtral saved by transformers 5 (fused experts): each expert matrix still loads as a 4-bit
    layer holding NF4 of its rows of the fused tensor (w1 the gate half, w3 the up half), and the
    merged export writes the checkpoint's own fused keys and shapes back, plain transformers loading it."""
    from safetensors import safe_open

    import qolora

    fused = quant.CheckpointWeights(fused_mixtral_dir)
    assert not [k for k in fused.keys() if ".experts.0." in k] and names_for_type(fused.model_type)
    model = quant.load_quantized(fused_mixtral_dir)
    assert not [n for n, p in model.named_parameters() if p.ndim == 3]
    i = 128
    with safe_open(str(fused_mixtral_dir / "model.safetensors"), framework="pt") as h:
        gate_up = h.get_tensor("model.layers.1.mlp.experts.gate_up_proj")
    for e, name, rows in ((2, "w1", slice(0, i)), (5, "w3", slice(i, 2 * i))):
        lin = model.get_submodule(f"model.layers.1.mlp.experts.{e}.{name}")
        want = quant.roundtrip(gate_up[e, rows].contiguous(), quant.quant_settings(lin))
        assert torch.equal(quant.dequantize(lin).float(), want.float()), (e, name)
        assert torch.equal(fused.get(f"model.layers.1.mlp.experts.{e}.{name}.weight"), gate_up[e, rows])
    from peft import LoraConfig

    peft = qolora.get_qolora_model(
        model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora"), progress=False
    )
    assert peft.qolora_states["default"].report.sources() == {"checkpoint": 4 * 2 + 8 * 3 * 2}
    qolora.save_adapter(peft, fused_mixtral_dir.parent / "fused_adapter")
    out = fused_mixtral_dir.parent / "fused_merged"
    qolora.export_merged(
        fused_mixtral_dir.parent / "fused_adapter", out, mode="original", dtype="float32", progress=False
    )
    merged = quant.CheckpointWeights(out)
    assert sorted(merged.keys()) == sorted(fused.keys())
    assert all(merged.shape(k) == fused.shape(k) for k in fused.keys())
    got = merged.get("model.layers.1.mlp.experts.gate_up_proj")
    assert (got - gate_up).abs().max() < 1e-5  # the initial model: W + s(B·A - B0·A0) = W
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert plain.model.layers[1].mlp.experts.gate_up_proj.shape == gate_up.shape


def test_fused_experts_of_an_unknown_layout_load_as_stored_and_say_so(fused_mixtral_dir, monkeypatch, caplog) -> None:
    """Fused experts whose per-matrix names QOLoRA cannot tell (no conversion mapping names them)
    are not unfused (that would leave 4-bit layers with no weights): they load fused and 16-bit, and
    one warning names them with their memory."""
    import logging

    import qolora.quant.experts as experts

    monkeypatch.setattr(experts, "names_for_type", lambda model_type: None)
    with caplog.at_level(logging.WARNING, logger="qolora"):
        loaded = quant.load_quantized(fused_mixtral_dir)
    assert not any(isinstance(m, UnfusedExperts) for m in loaded.modules())
    model = transformers.AutoModelForCausalLM.from_pretrained(fused_mixtral_dir, dtype=torch.float32)
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


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    """A tiny gpt-oss, its experts, biases and router random (not the zeros/ones of its init)."""
    d = tmp_path_factory.mktemp("gpt_oss")
    tok = make_tokenizer()
    model = build(next(f for f in FAMILIES if f.name == "gpt-oss"), tok)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for n, p in model.named_parameters():
            if ".mlp." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_gpt_oss_experts_load_as_nf4_of_each_stored_slice_from_the_fused_checkpoint(gpt_oss_dir, monkeypatch) -> None:
    """gpt-oss stores its experts fused ((E, in, out), biased): each expert matrix loads as a 4-bit
    layer holding NF4 of its slice, transposed; its bias as stored; no fused copy is made; the
    checkpoint's per-expert views read the same slices."""
    from safetensors import safe_open

    from qolora.quant.experts import InterleavedExpert, stores_experts_per_matrix

    fused = []
    cls = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts
    init = cls.__init__

    def record(self, *a, **k):
        init(self, *a, **k)
        fused.append(self)

    monkeypatch.setattr(cls, "__init__", record)
    assert stores_experts_per_matrix(gpt_oss_dir)
    model = quant.load_quantized(gpt_oss_dir)
    assert fused and all(p.device.type == "meta" for m in fused for p in m.parameters())
    assert not [n for n, p in model.named_parameters() if p.ndim == 3]
    experts = [m for m in model.modules() if isinstance(m, InterleavedExpert)]
    assert len(experts) == 2 * 8 and all(quant.is_4bit(m.gate_up_proj) and quant.is_4bit(m.down_proj) for m in experts)
    ckpt = quant.CheckpointWeights(gpt_oss_dir)
    with safe_open(str(gpt_oss_dir / "model.safetensors"), framework="pt") as h:
        for layer, e, name in ((0, 0, "gate_up_proj"), (1, 5, "down_proj"), (1, 7, "gate_up_proj")):
            module = f"model.layers.{layer}.mlp.experts.{e}.{name}"
            stored = h.get_tensor(f"model.layers.{layer}.mlp.experts.{name}")[e].T.float()
            assert torch.equal(ckpt.get(ckpt.find(module, ("model",))), stored)
            assert ckpt.shape(f"{module}.weight") == tuple(stored.shape)
            lin = model.get_submodule(module)
            want = quant.roundtrip(stored.contiguous(), quant.quant_settings(lin))
            assert torch.equal(quant.dequantize(lin).float(), want.float()), module
            bias = h.get_tensor(f"model.layers.{layer}.mlp.experts.{name}_bias")[e]
            assert torch.equal(lin.bias.data.float(), bias.float()) and torch.equal(ckpt.get(f"{module}.bias"), bias)
    assert ckpt.experts_of("model.layers.1.mlp.experts.down_proj") == [
        [f"model.layers.1.mlp.experts.{e}.down_proj.weight"] for e in range(8)
    ]
    # parameter bytes: every expert weight is packed 4-bit (half a byte per element)
    packed = sum(m.weight.numel() for x in experts for m in (x.gate_up_proj, x.down_proj))
    assert packed * 2 == 2 * 8 * (64 * 256 + 128 * 64)


def test_the_gpt_oss_unfused_forward_is_the_fused_forward(gpt_oss_dir) -> None:
    """fp32, no quantization: one biased layer per expert matrix, the interleaved clamped SwiGLU
    between them, gives transformers' fused output (the clamp active on some entries)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt_oss_dir, dtype=torch.float32)
    fused = model.model.layers[0].mlp.experts
    unfused = UnfusedExperts(fused)
    with torch.no_grad():
        for e, expert in enumerate(unfused):
            expert.gate_up_proj.weight.copy_(fused.gate_up_proj[e].T)
            expert.gate_up_proj.bias.copy_(fused.gate_up_proj_bias[e])
            expert.down_proj.weight.copy_(fused.down_proj[e].T)
            expert.down_proj.bias.copy_(fused.down_proj_bias[e])
        x = torch.randn(12, 64, generator=torch.Generator().manual_seed(1)) * 60  # past the clamp (7)
        assert (x @ fused.gate_up_proj[0]).abs().max() > fused.limit
        idx = torch.randint(0, 8, (12, 2), generator=torch.Generator().manual_seed(2))
        w = torch.rand(12, 2, generator=torch.Generator().manual_seed(3))
        want = fused(x, idx, w)
        assert (unfused(x, idx, w) - want).abs().max() <= 1e-5 * want.abs().max()
        unfused[3].gate_up_proj.bias.add_(0.5)  # negative control: a wrong expert shows
        assert (unfused(x, idx, w) - want).abs().max() > 1e-3


def test_an_mxfp4_checkpoint_is_refused_in_one_line(gpt_oss_dir, tmp_path) -> None:
    """gpt-oss's own release stores its experts in MXFP4 (``_blocks``, ``_scales``): no 16-bit weight
    to quantize or factor. One line says so and names the way out, before any weight loads."""
    import json
    import shutil

    d = tmp_path / "mxfp4"
    shutil.copytree(gpt_oss_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"mxfp4/config.json: the checkpoint is already quantized \(quant_method 'mxfp4'\).*BF16"
    ):
        quant.load_quantized(d)


def test_a_moe_run_resumes_after_kill_9_with_the_uninterrupted_losses(gpt_oss_dir, tmp_path, monkeypatch) -> None:
    """kill -9 right after checkpoint-4 of a gpt-oss run (every expert matrix 4-bit and adapted), then
    ``--resume``: steps 5-7 run, and every logged loss equals the uninterrupted run's."""
    from .conftest import assert_resume_after_kill_9_is_exact

    metrics = assert_resume_after_kill_9_is_exact(gpt_oss_dir, tmp_path, monkeypatch)
    assert sum(".experts." in x["name"] for x in metrics["init_report"]["layers"]) == 2 * 8 * 2  # all adapted


@pytest.mark.parametrize("family", ["Mixtral", "gpt-oss"])
def test_the_portable_lora_targets_the_stock_fused_experts_exactly(family, tmp_path) -> None:
    """``qolora export lora`` of a MoE adapter loads with plain PEFT on stock transformers (fused
    experts: PEFT's target_parameters) and equals the original-base merge (fp32). Before, PEFT matched
    none of the per-expert layer names and dropped the experts' adapters without a word."""
    import json

    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file, save_file

    import qolora

    tok = make_tokenizer()
    build(next(f for f in FAMILIES if f.name == family), tok).save_pretrained(tmp_path / "m")
    model = qolora.get_qolora_model(
        quant.load_quantized(tmp_path / "m"),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora"),
        progress=False,
    )
    with torch.no_grad():  # a trained adapter: B moved off its initial factor
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    qolora.save_adapter(model, tmp_path / "a")
    qolora.export_lora(tmp_path / "a", tmp_path / "lora")
    qolora.export_merged(tmp_path / "a", tmp_path / "merged", mode="original", dtype="float32", progress=False)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert len(cfg["target_parameters"]) == 2 * 2 and all(".experts." not in m for m in cfg["target_modules"])

    def logits(model_or_path, lora=None) -> torch.Tensor:
        m = transformers.AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
        m = PeftModel.from_pretrained(m, lora) if lora else m
        ids = torch.randint(3, len(tok), (1, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return m(ids).logits

    want = logits(tmp_path / "merged")
    assert (logits(tmp_path / "m", tmp_path / "lora") - want).abs().max() < 1e-5
    # negative control: without the experts' tensors the adapter misses the merge
    kept = {k: v for k, v in load_file(tmp_path / "lora" / "adapter_model.safetensors").items() if ".experts." not in k}
    (tmp_path / "attn").mkdir()
    save_file(kept, str(tmp_path / "attn" / "adapter_model.safetensors"))
    cfg.pop("target_parameters")
    (tmp_path / "attn" / "adapter_config.json").write_text(json.dumps(cfg))
    assert (logits(tmp_path / "m", tmp_path / "attn") - want).abs().max() > 1e-3


def test_an_expert_no_token_reaches_still_gets_a_zero_gradient(mixtral_dir) -> None:
    """As a fused expert's slice does: every expert's parameters get a gradient, zero for an expert
    no token reaches, and the output is unchanged. FSDP's gradient reduce-scatter needs the same
    parameters with gradients on every rank (2 FSDP ranks = 1 rank: tests/test_distributed.py)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    unfused = UnfusedExperts(model.model.layers[0].mlp.experts, stored_names(model))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[0, 1]] * 6)  # experts 0 and 1 only
    w = torch.rand(6, 2, generator=torch.Generator().manual_seed(3))
    out = unfused(x, idx, w)
    out.sum().backward()
    grads = [p.grad for p in unfused.parameters()]
    assert all(g is not None for g in grads)
    assert all(float(p.grad.abs().sum()) == 0.0 for e in range(2, 8) for p in unfused[e].parameters())
    assert all(float(p.grad.abs().sum()) > 0.0 for e in range(2) for p in unfused[e].parameters())
    want = sum(unfused[e](x, unfused.act_fn) * w[:, e : e + 1] for e in range(2))
    assert torch.equal(out, want) or (out - want).abs().max() < 1e-6
