"""save_adapter / load_adapter: exact reload with no QR and no pickle; clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import qolora
from qolora import quant

from .conftest import logits, perturb_lora_


def _cfg(init: object = "olora") -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=init)


@pytest.mark.parametrize("source", ["checkpoint", "dequantized"])
def test_reload_is_bit_identical_and_runs_no_qr(base_copy, tmp_path, tokens, source, monkeypatch) -> None:
    model = perturb_lora_(
        qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(), init_source=source, progress=False)
    )
    want = logits(model, tokens)
    out = qolora.save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "qolora.json",
        "initial_factors.safetensors",
    }

    def no_qr(*a, **k):
        raise AssertionError("load_adapter ran a QR")

    def no_pickle(*a, **k):
        raise AssertionError("load_adapter unpickled something")

    monkeypatch.setattr(torch.linalg, "qr", no_qr)
    monkeypatch.setattr(torch, "load", no_pickle)
    reloaded = qolora.load_adapter(out, progress=False)
    assert isinstance(reloaded, PeftModel)
    assert torch.equal(logits(reloaded, tokens), want)


def test_reload_unquantized_and_resave(llama_dir, tmp_path, tokens) -> None:
    model = perturb_lora_(
        qolora.get_qolora_model(AutoModelForCausalLM.from_pretrained(llama_dir), _cfg(), progress=False)
    )
    want = logits(model, tokens)
    qolora.save_adapter(model, tmp_path / "a")
    reloaded = qolora.load_adapter(tmp_path / "a", progress=False)
    assert torch.equal(logits(reloaded, tokens), want)
    qolora.save_adapter(reloaded, tmp_path / "a")  # overwrite in place from a reloaded model
    assert torch.equal(logits(qolora.load_adapter(tmp_path / "a", progress=False), tokens), want)


def test_reload_with_given_base_and_trainable(llama_dir, tmp_path, tokens) -> None:
    model = perturb_lora_(qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(), progress=False))
    want = logits(model, tokens)
    qolora.save_adapter(model, tmp_path / "a")
    reloaded = qolora.load_adapter(tmp_path / "a", quant.load_quantized(llama_dir), is_trainable=True, progress=False)
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)
    assert torch.equal(logits(reloaded, tokens), want)


def test_plain_lora_round_trip(llama_dir, tmp_path, tokens) -> None:
    model = perturb_lora_(qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(init=True), progress=False))
    want = logits(model, tokens)
    qolora.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "initial_factors.safetensors").exists()
    assert torch.equal(logits(qolora.load_adapter(tmp_path / "a", progress=False), tokens), want)


def test_metadata_records_base_and_settings(base_copy, tmp_path) -> None:
    model = qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(), progress=False)
    qolora.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "qolora.json").read_text())
    assert meta["format_version"] == 3 and meta["data"] is None  # not made by qolora train
    assert meta["init"]["method"] == "olora" and meta["init"]["iters"] == 1 and meta["init"]["svd_niter"] is None
    assert meta["base_model"]["checkpoint"] == str(base_copy.resolve())
    assert meta["base_model"]["name_or_path"] == str(base_copy)  # not the last module's name ("lm_head")
    assert "model.safetensors" in meta["base_model"]["fingerprint"]["files"]
    assert meta["quant"]["quant_type"] == "nf4" and meta["quant"]["double_quant"] is True
    assert meta["init"]["layer_sources"]["model.layers.1.mlp.down_proj"] == "checkpoint"
    assert meta["versions"]["peft"] and meta["versions"]["torch"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "olora" and cfg["r"] == 8


def test_changed_or_missing_base_is_refused(base_copy, tmp_path) -> None:
    model = qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(), progress=False)
    qolora.save_adapter(model, tmp_path / "a")
    f = base_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="has changed since the adapter was initialized"):
        qolora.load_adapter(tmp_path / "a", progress=False)
    shutil.rmtree(base_copy)
    with pytest.raises(FileNotFoundError, match="qolora.json"):
        qolora.load_adapter(tmp_path / "a", progress=False)


def test_bad_adapter_dirs(tmp_path, llama_dir) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qolora.load_adapter(tmp_path / "nope")
    model = qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(), progress=False)
    qolora.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "initial_factors.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="initial_factors.safetensors"):
        qolora.load_adapter(tmp_path / "a", progress=False)
    (tmp_path / "a" / "qolora.json").write_text('{"format": "qolora-adapter", "format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        qolora.load_adapter(tmp_path / "a", progress=False)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        qolora.load_adapter(tmp_path / "a", progress=False)


def test_quantization_mismatch_is_refused(llama_dir, tmp_path) -> None:
    model = qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(), progress=False)
    qolora.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="4-bit base"):
        qolora.load_adapter(tmp_path / "a", AutoModelForCausalLM.from_pretrained(llama_dir), progress=False)


def test_save_without_state_and_interrupted_save(llama_dir, tmp_path, monkeypatch) -> None:
    from peft import get_peft_model

    with pytest.raises(ValueError, match="no QOLoRA state"):
        qolora.save_adapter(get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), _cfg(True)), tmp_path / "x")
    model = qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(), progress=False)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("qolora.adapter_dir.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        qolora.save_adapter(model, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []  # neither the dir nor a temp dir is left behind


def test_format_1_dirs_still_load_and_take_data_settings_from_the_run(base_copy, tmp_path) -> None:
    """Format 1 had no "data" field; its reader takes the run's config.yaml beside the adapter."""
    from qolora.adapter_dir import read_adapter_dir

    model = perturb_lora_(qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(), progress=False))
    qolora.save_adapter(model, tmp_path / "run" / "adapter")
    path = tmp_path / "run" / "adapter" / "qolora.json"
    meta = json.loads(path.read_text())
    meta["format_version"] = 1
    del meta["data"]
    path.write_text(json.dumps(meta))
    assert read_adapter_dir(path.parent).meta.data is None
    (tmp_path / "run" / "config.yaml").write_text("data: {train: t.jsonl, template: plain, max_length: 64}\n")
    assert read_adapter_dir(path.parent).meta.data == {"train": "t.jsonl", "template": "plain", "max_length": 64}
    x = torch.randint(0, 128, (1, 12))
    assert torch.equal(logits(qolora.load_adapter(path.parent, progress=False), x), logits(model, x))
    meta["format_version"] = 4
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 4 is not supported"):
        read_adapter_dir(path.parent)


def test_balanced_olora_keeps_the_4bit_base_and_reloads_exactly(base_copy, tmp_path, tokens) -> None:
    plain = qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(), progress=False)
    bal = qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(), progress=False, balance=True)
    n = 0
    for (name, m), (_, mb) in zip(plain.named_modules(), bal.named_modules(), strict=True):
        if quant.is_4bit(m):
            assert torch.equal(m.weight.data, mb.weight.data), name  # same product, so the same residual bytes
            n += 1
    assert n == 14
    lyr = bal.base_model.model.model.layers[0].self_attn.q_proj
    ref = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(lyr.lora_A["default"].weight, ref.lora_A["default"].weight)
    assert torch.allclose(logits(bal, tokens), logits(plain, tokens), atol=1e-5, rtol=0)
    model = perturb_lora_(bal)
    want = logits(model, tokens)
    out = qolora.save_adapter(model, tmp_path / "adapter")
    assert torch.equal(logits(qolora.load_adapter(out, progress=False), tokens), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reload_keeps_the_adapter_dtype_a_trainer_left(base_copy, tmp_path, tokens, dtype) -> None:
    """TRL's SFTTrainer leaves the LoRA weights in bf16 (also on the CPU); the reload is that model."""
    model = perturb_lora_(qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(), progress=False))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)
    want = logits(model, tokens)
    reloaded = qolora.load_adapter(qolora.save_adapter(model, tmp_path / "adapter"), progress=False)
    assert {p.dtype for n, p in reloaded.named_parameters() if "lora_" in n} == {dtype}
    assert torch.equal(logits(reloaded, tokens), want)
