"""Exports: trained parity (fresh process, no qolora), the original formula, portable LoRA, atomicity, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qolora
from qolora import quant
from qolora.export import export_lora, export_merged
from qolora.export.merged import ShardWriter

from .conftest import logits, perturb_lora_


def _trained_adapter(base_dir, out, source="auto", targets="all-linear", compute_dtype="auto", **kw):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="olora", **kw)
    base = quant.load_quantized(base_dir, compute_dtype=compute_dtype)
    model = perturb_lora_(qolora.get_qolora_model(base, cfg, init_source=source, progress=False), 0.05)
    qolora.save_adapter(model, out)
    return model


FRESH = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    x = torch.tensor([[int(t) for t in sys.argv[3].split(",")]])
    with torch.no_grad():
        save_file({"logits": m(input_ids=x).logits}, sys.argv[2])
    assert "qolora" not in sys.modules
""")


def test_trained_export_matches_4bit_model_in_fresh_process(base_copy, tmp_path, tokens) -> None:
    model = _trained_adapter(base_copy, tmp_path / "a")
    x = tokens[:1]
    want = logits(model, x)
    res = export_merged(tmp_path / "a", tmp_path / "m", progress=False)
    assert res.merged_layers == 14 and res.bytes_written > 0
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "README.md", "generation_config.json"} <= files
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "m"),
            str(tmp_path / "l.safetensors"),
            ",".join(map(str, x[0].tolist())),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    got = load_file(str(tmp_path / "l.safetensors"))["logits"]
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()  # fp16 weight rounding
    exact = export_merged(tmp_path / "a", tmp_path / "m32", dtype="float32", progress=False)
    fp32 = AutoModelForCausalLM.from_pretrained(exact.out_dir, dtype=torch.float32)
    assert (logits(fp32, x) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("source", ["dequantized", "checkpoint"])
def test_trained_export_parity_sources_and_partial_targets(base_copy, tmp_path, tokens, source) -> None:
    model = _trained_adapter(base_copy, tmp_path / "a", source=source, targets=["q_proj", "down_proj"])
    want = logits(model, tokens)
    export_merged(tmp_path / "a", tmp_path / "m", dtype="float32", progress=False)
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32), tokens)
    assert (got - want).abs().max() <= 1e-4  # non-target linears are exported as their NF4 values too


def test_gpt2_conv1d_trained_export(gpt2_dir, tmp_path, tokens) -> None:
    d = tmp_path / "gpt2"
    shutil.copytree(gpt2_dir, d)
    model = _trained_adapter(d, tmp_path / "a", targets=["c_attn", "c_proj", "c_fc"])
    want = logits(model, tokens)
    export_merged(tmp_path / "a", tmp_path / "m", dtype="float32", progress=False)
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32), tokens)
    assert (got - want).abs().max() <= 1e-4


def test_original_formula_and_portable_lora(base_copy, tmp_path, tokens) -> None:
    _trained_adapter(base_copy, tmp_path / "a")
    export_merged(tmp_path / "a", tmp_path / "orig", mode="original", dtype="float32", progress=False)
    merged = {}
    for f in (tmp_path / "orig").glob("*.safetensors"):
        merged.update(load_file(str(f)))
    base = load_file(str(base_copy / "model.safetensors"))
    ad = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    f0 = load_file(str(tmp_path / "a" / "initial_factors.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    B, A = ad[f"base_model.model.{name}.lora_B.weight"], ad[f"base_model.model.{name}.lora_A.weight"]
    want = base[f"{name}.weight"] + 2.0 * (B @ A - f0[f"{name}.B0"] @ f0[f"{name}.A0"])
    assert (merged[f"{name}.weight"] - want).abs().max() <= 1e-5
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])

    gap = export_lora(tmp_path / "a", tmp_path / "lora", measure_gap=True).gap
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["init_lora_weights"] is True
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_copy), tmp_path / "lora")
    orig_model = AutoModelForCausalLM.from_pretrained(tmp_path / "orig", dtype=torch.float32)
    assert (logits(on_original, tokens) - logits(orig_model, tokens)).abs().max() <= 1e-4
    assert 0.01 < gap < 0.2  # the residual's NF4 error, reported honestly


def test_rslora_portable_alpha(base_copy, tmp_path, tokens) -> None:
    _trained_adapter(base_copy, tmp_path / "a", use_rslora=True)
    export_lora(tmp_path / "a", tmp_path / "lora")
    export_merged(tmp_path / "a", tmp_path / "orig", mode="original", dtype="float32", progress=False)
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_copy), tmp_path / "lora")
    orig_model = AutoModelForCausalLM.from_pretrained(tmp_path / "orig", dtype=torch.float32)
    assert (logits(on_original, tokens) - logits(orig_model, tokens)).abs().max() <= 1e-4


def test_interrupted_export_leaves_nothing(base_copy, tmp_path, monkeypatch) -> None:
    _trained_adapter(base_copy, tmp_path / "a")
    calls = {"n": 0}
    orig_add = ShardWriter.add

    def crash_midway(self, key, t):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        orig_add(self, key, t)

    monkeypatch.setattr(ShardWriter, "add", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        export_merged(tmp_path / "a", tmp_path / "m", max_shard_bytes=20_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


def test_small_shards_and_bad_inputs(base_copy, tmp_path) -> None:
    _trained_adapter(base_copy, tmp_path / "a")
    export_merged(tmp_path / "a", tmp_path / "m", max_shard_bytes=30_000, progress=False)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_merged(tmp_path / "a", tmp_path / "m", progress=False)
    export_merged(tmp_path / "a", tmp_path / "m", overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_merged(tmp_path / "nope", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="mode"):
        export_merged(tmp_path / "a", tmp_path / "x", mode="best", progress=False)
    f = base_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="has changed"):
        export_merged(tmp_path / "a", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="has changed"):
        export_lora(tmp_path / "a", tmp_path / "y")
    shutil.rmtree(base_copy)
    with pytest.raises(FileNotFoundError, match="was not found"):
        export_merged(tmp_path / "a", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export(base_copy, tmp_path, capsys) -> None:
    from qolora.cli import main

    _trained_adapter(base_copy, tmp_path / "a")
    assert main(["export", "merged", str(tmp_path / "a"), str(tmp_path / "m")]) == 0
    assert "MiB" in capsys.readouterr().out
    assert main(["export", "merged", str(tmp_path / "a"), str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().endswith("already exists; pass --overwrite to replace it")
    assert main(["export", "lora", str(tmp_path / "a"), str(tmp_path / "l"), "--gap"]) == 0
    assert "gap to the trained model" in capsys.readouterr().out
