"""Bases QOLoRA must rebuild exactly (any load dtype, CPU-unsupported shapes kept unquantized)
or refuse before corrupting them (8-bit layers, nested PEFT models, a second OLoRA adapter)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

import qolora
from qolora import quant

from .conftest import logits, perturb_lora_


def _cfg(init: object = "olora", r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights=init)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reload_rebuilds_the_recorded_load_dtype(llama_dir, tmp_path, tokens, dtype) -> None:
    """A base loaded in bf16/fp16 with fp32 compute reloads in that dtype, not the compute dtype."""
    base = quant.load_quantized(llama_dir, compute_dtype="float32", dtype=dtype)
    model = perturb_lora_(qolora.get_qolora_model(base, _cfg(), progress=False))
    want = logits(model, tokens)
    qolora.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "qolora.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    back = qolora.load_adapter(tmp_path / "a", progress=False)
    assert back.get_input_embeddings().weight.dtype == dtype
    assert torch.equal(logits(back, tokens), want)


@pytest.fixture(scope="module")
def odd_llama_dir(tmp_path_factory: pytest.TempPathFactory):
    """intermediate_size 1376: down_proj's in_features is not a multiple of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("odd_llama")
    torch.manual_seed(5)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=1376,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(d)
    return d


def test_cpu_unsupported_layers_stay_unquantized_and_reload_exactly(odd_llama_dir, tmp_path, tokens, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="qolora"):
        base = quant.load_quantized(odd_llama_dir)
    kept = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not quant.is_4bit(m)]
    assert kept == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert sum(quant.is_4bit(m) for m in base.modules()) == 12  # q k v o gate up, 2 layers
    assert "keeping 2 linear layers unquantized" in caplog.text and "layers.0.mlp.down_proj" in caplog.text
    assert "stayed in full precision" not in caplog.text  # kept by choice, and named: not silent
    with caplog.at_level(logging.WARNING, logger="qolora"):
        model = perturb_lora_(qolora.get_qolora_model(base, _cfg(), progress=False))
    assert "2 of 14 targets are not 4-bit on this 4-bit base (model.layers.0.mlp.down_proj" in caplog.text
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()  # bitsandbytes' CPU kernels crash on such layers
    want = logits(model, tokens)
    qolora.save_adapter(model, tmp_path / "a")
    assert torch.equal(logits(qolora.load_adapter(tmp_path / "a", progress=False), tokens), want)


def test_a_cpu_unsupported_4bit_layer_is_refused_by_name(odd_llama_dir) -> None:
    base = quant.load_quantized(odd_llama_dir, skip_modules=[])  # forced to 4-bit: would crash at forward
    with pytest.raises(ValueError, match=r"cannot run these 4-bit layers on the CPU .*model.layers.0.mlp.down_proj"):
        qolora.get_qolora_model(base, _cfg(), progress=False)


def test_an_8bit_base_is_refused(llama_dir) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": "cpu"}
    )
    assert any(quant.is_8bit(m) for m in base.modules())
    with pytest.raises(
        ValueError, match=r"14 layers are bitsandbytes 8-bit \(first: model.layers.0.self_attn.q_proj\)"
    ):
        qolora.get_qolora_model(base, _cfg(), progress=False)
    assert not any("lora_A" in n for n, _ in base.named_modules())  # refused before PEFT touched it


def test_an_already_wrapped_model_is_refused(llama_dir) -> None:
    peft_model = get_peft_model(quant.load_quantized(llama_dir), _cfg(True))
    with pytest.raises(ValueError, match="already has PEFT adapter layers"):
        qolora.get_qolora_model(peft_model, _cfg(), progress=False)


def test_a_second_olora_adapter_gets_the_initial_factors_and_the_base_is_kept(llama_dir, tokens) -> None:
    model = qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(), progress=False)
    want = logits(model, tokens)
    before = {n: quant.dequantize(m) for n, m in model.named_modules() if quant.is_4bit(m)}
    perturb_lora_(model)
    model.add_adapter("copy", _cfg("olora"))  # no QR, no base rewrite: this base's initial factors
    model.set_adapter("copy")
    assert torch.equal(logits(model, tokens), want)
    with pytest.raises(ValueError, match=r"add_adapter\('other'\) with init_lora_weights='olora': its rank or scale"):
        model.add_adapter(
            "other", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights="olora")
        )
    assert "other" not in model.peft_config and "other" not in model.qolora_states
    plain = qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(True), progress=False)
    with pytest.raises(ValueError, match="would let PEFT rewrite the 4-bit base"):
        plain.add_adapter("second", _cfg("olora"))
    model.add_adapter("second", _cfg(True))  # allowed (PEFT's conversion flow does it), never saved
    with pytest.raises(ValueError, match=r"save_adapter\('second'\): it was added on the OLoRA residual of adapter"):
        qolora.save_adapter(model, "unused", adapter_name="second")
    model.delete_adapter("second")
    assert list(model.qolora_states) == ["default", "copy"]
    after = {n: quant.dequantize(m) for n, m in model.named_modules() if quant.is_4bit(m)}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_second_plain_lora_adapter_on_a_lora_model_saves(llama_dir, tmp_path, tokens) -> None:
    model = qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(True), progress=False)
    model.add_adapter("second", _cfg(True))
    model.set_adapter("second")
    perturb_lora_(model)
    want = logits(model, tokens)
    qolora.save_adapter(model, tmp_path / "b", adapter_name="second")
    back = qolora.load_adapter(tmp_path / "b", progress=False)
    assert back.active_adapter == "second" and torch.equal(logits(back, tokens), want)


def test_rank_above_a_target_shape_is_refused_before_peft_allocates(llama_dir) -> None:
    base = quant.load_quantized(llama_dir)
    with pytest.raises(
        ValueError,
        match=r"adapter.r: rank 100000 exceeds min\(out, in\) = 32 of "
        r"model.layers.0.self_attn.k_proj",
    ):
        qolora.get_qolora_model(base, _cfg(r=100000), progress=False)


def test_held_bytes_count_what_the_model_holds(llama_dir) -> None:
    """metrics.json's model_bytes: a 4-bit model's linears are about a quarter of their fp32 bytes plus
    the statistics, and none is left in full precision; unquantized, every linear is."""
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    full = quant.held_bytes(fp32)
    linears = sum(m.weight.numel() * 4 for n, m in fp32.named_modules() if n.endswith("_proj"))
    assert full == {"4bit_layers": 0, "full_precision_linears": linears, "other": full["other"]}
    assert full["other"] + linears == sum(p.numel() * 4 for p in fp32.parameters()) + sum(
        b.numel() * b.element_size() for b in fp32.buffers()
    )
    q = quant.held_bytes(quant.load_quantized(llama_dir))
    assert q["full_precision_linears"] == 0 and q["other"] == full["other"]
    # 0.5 byte per weight, plus absmax and the two 256-entry codebooks of each of the 14 tiny layers
    assert linears / 8 < q["4bit_layers"] < linears / 8 + 14 * 2 * 1024 + linears / 4 / 64


def test_a_linear_subclass_left_in_full_precision_is_named_in_one_warning(tmp_path, monkeypatch, caplog) -> None:
    """Falcon's layers are an nn.Linear subclass, which transformers 5 does not convert: QOLoRA has
    them converted (LINEAR_EQUIVALENT). Without that, the load names them in one warning."""
    from .conftest import make_bpe_tokenizer
    from .model_matrix import FAMILIES, build

    build(next(f for f in FAMILIES if f.name == "Falcon"), make_bpe_tokenizer()).save_pretrained(tmp_path)
    base = quant.load_quantized(tmp_path)
    assert sum(quant.is_4bit(m) for m in base.modules()) == 8 and quant.full_precision_linears(base, set()) == []
    monkeypatch.setattr("qolora.quant.loading.LINEAR_EQUIVALENT", ())
    with caplog.at_level(logging.WARNING, logger="qolora"):
        base = quant.load_quantized(tmp_path)
    lines = [r.getMessage() for r in caplog.records if "stayed in full precision" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("8 linear layers stayed in full precision (FalconLinear: ")
    assert "transformer.h.0.self_attention.query_key_value" in lines[0]
    assert quant.held_bytes(base)["full_precision_linears"] > 0
