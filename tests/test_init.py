"""get_qolora_model: PEFT parity, output preservation, fidelity, Conv1D, sources, errors."""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import qolora
from qolora import quant
from qolora.initialize import WeightSource

from .conftest import assert_same_state, logits


def _cfg(r: int = 8, alpha: int | None = None, init: object = "olora", **kw: object) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha or r, target_modules="all-linear", init_lora_weights=init, **kw)


def _fp32(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_unquantized_matches_peft_olora(llama_dir) -> None:
    ours = qolora.get_qolora_model(_fp32(llama_dir), _cfg(alpha=16), progress=False)
    assert_same_state(ours, get_peft_model(_fp32(llama_dir), _cfg(alpha=16)), n_lora=28)


def test_unquantized_fp32_init_preserves_outputs(llama_dir, tokens) -> None:
    before = logits(_fp32(llama_dir), tokens)
    after = logits(qolora.get_qolora_model(_fp32(llama_dir), _cfg(alpha=32), progress=False), tokens)
    assert (after - before).abs().max() <= 1e-4


def test_gpt2_conv1d_fan_in_fan_out(gpt2_dir, tokens) -> None:
    cfg = LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights="olora"
    )
    base = _fp32(gpt2_dir)
    before = logits(base, tokens)
    model = qolora.get_qolora_model(base, cfg, progress=False)
    assert (logits(model, tokens) - before).abs().max() <= 1e-4
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    W = _fp32(gpt2_dir).transformer.h[0].attn.c_attn.weight.T  # Conv1D stores (in, out)
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    Q, R = torch.linalg.qr(W)
    assert (B - Q[:, :4]).abs().max() <= 1e-5 and (A - R[:4]).abs().max() <= 1e-5


def test_gpt2_4bit_uses_checkpoint_in_either_orientation(gpt2_dir) -> None:
    model = qolora.get_qolora_model(
        quant.load_quantized(gpt2_dir),
        LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights="olora"),
        progress=False,
    )
    report = model.qolora_states["default"].report
    assert report.sources() == {"checkpoint": 8}
    assert len(model.qolora_states["default"].meta.transposed) == 8  # Conv1D checkpoints store (in, out)
    assert all(x.rel_err < x.qlora_rel_err * 1.05 for x in report.layers)


def _peft_olora_errors(folder) -> list[float]:
    """PEFT's init_lora_weights="olora" on the 4-bit base: its initial weight error per layer."""
    ref = {n: p.detach() for n, p in _fp32(folder).named_parameters()}
    model = get_peft_model(quant.load_quantized(folder), _cfg())
    errs = []
    for name, m in model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            W = ref[f"{name}.weight"]
            eff = quant.dequantize(m.get_base_layer()) + m.scaling["default"] * (
                m.lora_B["default"].weight @ m.lora_A["default"].weight
            )
            errs.append(float((W - eff).norm() / W.norm()))
    return errs


def test_checkpoint_source_beats_qlora_and_peft_on_outlier_weights(outlier_llama_dir) -> None:
    model = qolora.get_qolora_model(quant.load_quantized(outlier_llama_dir), _cfg(), progress=False)
    report = model.qolora_states["default"].report
    assert report.sources() == {"checkpoint": 14}
    for x in report.layers:
        assert x.rel_err <= x.qlora_rel_err, x
    # the report's error is the real one: recompute layer 0's from scratch
    W = _fp32(outlier_llama_dir).model.layers[0].self_attn.q_proj.weight.detach()
    lyr = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        eff = quant.dequantize(lyr.get_base_layer()) + lyr.lora_B["default"].weight @ lyr.lora_A["default"].weight
    assert abs(float((W - eff).norm() / W.norm()) - report.layers[0].rel_err) < 1e-5
    peft_errs = _peft_olora_errors(outlier_llama_dir)
    assert sum(x.rel_err for x in report.layers) < sum(peft_errs)


def test_dequantized_source_is_logged_and_recorded(llama_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="qolora"):
        model = qolora.get_qolora_model(
            quant.load_quantized(llama_dir), _cfg(), init_source="dequantized", progress=False
        )
    assert model.qolora_states["default"].report.sources() == {"dequantized": 14}
    assert model.qolora_states["default"].meta.layer_sources["model.layers.0.mlp.up_proj"] == "dequantized"


def test_auto_falls_back_with_warning_when_no_checkpoint(llama_dir, caplog) -> None:
    base = quant.load_quantized(llama_dir)
    base.name_or_path = ""  # as for a model built in memory
    with caplog.at_level(logging.WARNING, logger="qolora"):
        model = qolora.get_qolora_model(base, _cfg(), progress=False)
    assert model.qolora_states["default"].report.sources() == {"dequantized": 14}
    assert "dequantized 4-bit weights" in caplog.text


def test_checkpoint_source_required_but_missing(llama_dir) -> None:
    base = quant.load_quantized(llama_dir)
    base.name_or_path = ""
    with pytest.raises(ValueError, match="init_source='checkpoint'"):
        qolora.get_qolora_model(base, _cfg(), init_source="checkpoint", progress=False)


def test_mismatched_checkpoint_is_not_used(llama_dir, outlier_llama_dir) -> None:
    with pytest.raises(ValueError, match="does not match the loaded weight"):
        qolora.get_qolora_model(
            quant.load_quantized(llama_dir),
            _cfg(),
            init_source="checkpoint",
            checkpoint=outlier_llama_dir,
            progress=False,
        )


def test_quant_settings_survive_init(llama_dir) -> None:
    base = quant.load_quantized(llama_dir)
    # a non-default blocksize and a bf16 quant_state dtype, as PEFT's olora would lose them
    s = quant.QuantSettings("nf4", 128, False, torch.uint8, torch.bfloat16)
    for m in base.modules():
        if quant.is_4bit(m):
            quant.requantize_(m, quant.dequantize(m), s)
    model = qolora.get_qolora_model(base, _cfg(), init_source="dequantized", progress=False)
    layers = [m for m in model.modules() if quant.is_4bit(m)]
    assert len(layers) == 14
    assert all(quant.quant_settings(m) == s for m in layers)


def test_bf16_adapter_residual_uses_stored_factors(llama_dir) -> None:
    from qolora.initialize import init_factored_
    from qolora.inits import InitSpec

    base = _fp32(llama_dir)
    W = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    model = get_peft_model(base, _cfg(alpha=16, init=False), autocast_adapter_dtype=False)
    for m in model.modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            m.lora_A["default"].to(torch.bfloat16)
            m.lora_B["default"].to(torch.bfloat16)
    init_factored_(model, InitSpec("olora"), progress=False)
    lyr = model.base_model.model.model.layers[0].mlp.up_proj
    Bs, As = lyr.lora_B["default"].weight, lyr.lora_A["default"].weight
    assert Bs.dtype == torch.bfloat16
    rebuilt = lyr.get_base_layer().weight + 2.0 * (Bs.float() @ As.float())
    assert (rebuilt - W).abs().max() <= 1e-5


def test_init_streams_one_layer_at_a_time(llama_dir, monkeypatch) -> None:
    """Each layer's W is freed before the next is fetched (docs/design.md, invariant 5)."""
    alive: list[weakref.ref] = []
    peak = 0
    orig = WeightSource.get

    def tracking_get(self, t, require=None):
        nonlocal peak
        gc.collect()
        peak = max(peak, sum(r() is not None for r in alive))
        out = orig(self, t, require)
        alive.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(WeightSource, "get", tracking_get)
    qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(), progress=False)
    assert len(alive) == 14 and peak == 0


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"r": 65}, "exceeds min"),
        ({"use_dora": True}, "use_dora"),
        ({"init": "corda"}, "init_lora_weights"),
    ],
)
def test_bad_configs_are_refused(llama_dir, kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        qolora.get_qolora_model(_fp32(llama_dir), _cfg(**kw), progress=False)


def test_bad_init_source_and_embedding_target(llama_dir) -> None:
    with pytest.raises(ValueError, match="init_source"):
        qolora.get_qolora_model(_fp32(llama_dir), _cfg(), init_source="disk", progress=False)
    with pytest.raises(ValueError, match="linear layers only"):
        qolora.get_qolora_model(
            _fp32(llama_dir),
            LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights="olora"),
            progress=False,
        )


def test_plain_lora_init_is_peft_default(llama_dir, tokens) -> None:
    base = _fp32(llama_dir)
    before = logits(copy.deepcopy(base), tokens)
    model = qolora.get_qolora_model(base, _cfg(init="lora"), progress=False)
    lyr = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(lyr.lora_B["default"].weight) == 0
    assert torch.equal(logits(model, tokens), before)
