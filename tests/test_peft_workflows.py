"""QOLoRA models inside PEFT's own documented workflows."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

import qolora
from qolora import quant
from qolora.export import export_lora

from .conftest import perturb_lora_


@pytest.mark.parametrize("variant", ["plain", "rank_pattern", "alpha_pattern", "rslora"])
def test_peft_olora_to_lora_conversion_equals_export_lora(llama_dir, tmp_path, variant) -> None:
    """PEFT's OLoRA -> LoRA conversion, ``save_pretrained(path_initial_model_for_weight_conversion=)``,
    on a QOLoRA model gives the delta of ``qolora.export_lora``: B'A' = BA - B0A0 per layer."""
    kw = {
        "plain": {},
        "rank_pattern": {"rank_pattern": {"q_proj": 4}},
        "alpha_pattern": {"alpha_pattern": {"v_proj": 4}},
        "rslora": {"use_rslora": True},
    }[variant]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="olora", **kw)
    model = qolora.get_qolora_model(quant.load_quantized(str(llama_dir)), cfg, progress=False)
    model.save_pretrained(str(tmp_path / "init"))  # PEFT's step 1: the initial adapter, before training
    perturb_lora_(model)
    qolora.save_adapter(model, tmp_path / "qolora")
    before = {n: quant.dequantize(m) for n, m in model.named_modules() if quant.is_4bit(m)}
    model.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    after = {n: quant.dequantize(m) for n, m in model.named_modules() if quant.is_4bit(m)}
    assert all(torch.equal(before[n], after[n]) for n in before)  # the temporary adapter left the base alone
    assert list(model.qolora_states) == ["default"]
    export_lora(tmp_path / "qolora", tmp_path / "ours")
    peft_sd, ours = (
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "ours" / "adapter_model.safetensors")),
    )
    assert set(peft_sd) == set(ours) and len(ours) == 28
    for key in (k for k in ours if k.endswith("lora_A.weight")):
        kb = key.replace("lora_A", "lora_B")
        delta_peft, delta_ours = peft_sd[kb] @ peft_sd[key], ours[kb] @ ours[key]
        # the same two rank-r products in fp32, stacked in another order and sign: rounding only
        assert torch.allclose(delta_peft, delta_ours, rtol=0, atol=1e-6), key
