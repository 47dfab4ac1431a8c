"""The PEFT contract: ``get_qolora_model`` accepts every LoraConfig ``get_peft_model`` accepts, and on
an unquantized fp32 model gives PEFT's own model (its olora factors, its targets, its ranks); what it
cannot honour is refused in one line. PEFT's own OLoRA tests run as a client in scripts/test.sh."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import qolora

from .conftest import assert_same_state


def _fp32(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


CONFIGS = {
    "default target_modules": ({}, 8),  # PEFT's Llama default: q_proj, v_proj
    "exclude_modules": ({"target_modules": "all-linear", "exclude_modules": ["k_proj", "down_proj"]}, 20),
    "layers_to_transform": ({"target_modules": ["q_proj", "o_proj"], "layers_to_transform": [1]}, 4),
    "rank_pattern and alpha_pattern": (
        {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"q_proj": 32}},
        8,
    ),
    "modules_to_save": ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, 4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_lora_config_peft_accepts_gives_peft_s_model(name, llama_dir) -> None:
    kw, n_lora = CONFIGS[name]
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights="olora", **kw)
    ours = qolora.get_qolora_model(_fp32(llama_dir), cfg, progress=False)
    ref = get_peft_model(_fp32(llama_dir), LoraConfig(r=8, lora_alpha=16, init_lora_weights="olora", **kw))
    assert_same_state(ours, ref, n_lora=n_lora)
    assert ours.peft_config["default"].target_modules == ref.peft_config["default"].target_modules


def test_a_rank_pattern_entry_too_large_for_its_layer_is_one_line(llama_dir) -> None:
    cfg = LoraConfig(r=8, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 48}, init_lora_weights="olora")
    with pytest.raises(ValueError, match=r"^rank_pattern\['k_proj'\]: rank 48 exceeds min\(out, in\) = 32 of"):
        qolora.get_qolora_model(_fp32(llama_dir), cfg, progress=False)


def test_target_parameters_with_a_factored_init_is_refused_in_one_line(llama_dir) -> None:
    cfg = LoraConfig(r=8, target_modules=[], target_parameters=["mlp.down_proj.weight"], init_lora_weights="olora")
    with pytest.raises(ValueError, match="^target_parameters: .* the olora init factors linear layers only") as e:
        qolora.get_qolora_model(_fp32(llama_dir), cfg, progress=False)
    assert "\n" not in str(e.value)


def test_no_target_modules_and_no_peft_default_is_one_line(gpt2_dir, monkeypatch) -> None:
    monkeypatch.setattr("peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {})
    with pytest.raises(ValueError, match="^adapter.target_modules: none given and PEFT has no default for model type"):
        qolora.get_qolora_model(_fp32(gpt2_dir), LoraConfig(r=8, init_lora_weights="olora"), progress=False)
