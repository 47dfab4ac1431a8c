"""NF4 re-quantization keeps every setting; 4-bit loading; dtype resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qolora import quant
from qolora.precision import parse_dtype, resolve_compute_dtype


@pytest.mark.parametrize("blocksize,dtype,double", [(128, torch.bfloat16, False), (256, torch.float16, True)])
def test_requantize_keeps_settings(blocksize: int, dtype: torch.dtype, double: bool) -> None:
    s = quant.QuantSettings("nf4", blocksize, double, torch.uint8, dtype)
    layer = quant.quantize_linear(nn.Linear(256, 128), s, compute_dtype=torch.float32)
    assert quant.quant_settings(layer) == s
    W = torch.randn(128, 256)
    quant.requantize_(layer, W)
    assert quant.quant_settings(layer) == s
    assert layer.weight.quant_state is layer.quant_state
    assert quant.dequantize(layer).dtype == torch.float32
    err = (quant.dequantize(layer) - W).norm() / W.norm()
    assert 0 < err < 0.15


def test_roundtrip_matches_layer_and_storage_dtype_survives() -> None:
    s = quant.QuantSettings("nf4", 64, True, torch.bfloat16, torch.float32)
    W = torch.randn(64, 128)
    layer = quant.quantize_linear(nn.Linear(128, 64), s, torch.float32)
    quant.requantize_(layer, W)
    assert layer.weight.data.dtype == torch.bfloat16
    assert torch.equal(quant.roundtrip(W, s), quant.dequantize(layer))


def test_settings_round_trip_through_dict() -> None:
    s = quant.QuantSettings("fp4", 32, False, torch.float16, torch.bfloat16)
    assert quant.QuantSettings.from_dict(s.to_dict()) == s


def test_load_quantized_gives_nf4_double_quant(llama_dir) -> None:
    model = quant.load_quantized(llama_dir)
    layers = [m for m in model.modules() if quant.is_4bit(m)]
    assert len(layers) == 14  # 7 projections x 2 decoder layers; lm_head stays unquantized
    s = quant.quant_settings(layers[0])
    assert (s.quant_type, s.double_quant, s.dtype) == ("nf4", True, torch.float32)
    assert model.model.norm.weight.dtype == torch.float32


def test_load_quantized_missing_folder() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quant.load_quantized("/nonexistent/model/folder")


def test_auto_dtype_is_fp32_on_cpu() -> None:
    assert resolve_compute_dtype("auto", device="cpu").dtype == torch.float32
    assert resolve_compute_dtype("bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype"):
        resolve_compute_dtype("float8")
    assert parse_dtype("torch.float16") == torch.float16


def test_fingerprint_detects_changed_weights(llama_dir, tmp_path) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(llama_dir, copy)
    fp = quant.fingerprint(copy)
    assert quant.fingerprint_mismatch(fp, copy) is None
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    f.write_bytes(bytes(data))
    assert "has changed" in quant.fingerprint_mismatch(fp, copy)
    f.unlink()
    assert quant.fingerprint_mismatch(fp, copy) is not None


def test_checkpoint_found_in_local_hf_cache(llama_dir, tmp_path, monkeypatch) -> None:
    """A hub id resolves to the cached snapshot, never the network."""
    import shutil

    import huggingface_hub.constants as hc

    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(llama_dir, snap)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert quant.find_checkpoint("acme/tiny") == snap
    assert quant.find_checkpoint("acme/not-cached") is None


@pytest.mark.parametrize("double", [True, False])
def test_a_4bit_weight_sent_as_bytes_rebuilds_bit_identically_on_a_meta_twin(double: bool) -> None:
    """What an FSDP rank other than 0 does with rank 0's layer (``qolora.fsdp``): a meta copy of the
    module tree gets ``Linear4bit`` where rank 0 has one, and the packed data and whole quant_state,
    as raw bytes, make the same weight: bit-equal dequantization and forward, NaN bit patterns kept."""
    g = torch.Generator().manual_seed(0)
    settings = quant.QuantSettings(double_quant=double, quant_storage=torch.float32)
    src = nn.Sequential(quant.linear4bit(torch.randn(128, 64, generator=g), settings, torch.float32))
    spec = quant.twin_spec(src)
    with torch.device("meta"):
        twin = nn.Sequential(nn.Linear(64, 128, bias=False))
    quant.make_4bit_twin_(twin, spec)
    assert quant.is_4bit(twin[0]) and twin[0].weight.device.type == "meta"
    info, parts = quant.weight_parts(src[0])
    sent = {k: t.contiguous().view(-1).view(torch.uint8).clone().view(t.dtype).reshape(t.shape) for k, t in parts}
    quant.set_weight_(twin[0], info, sent)
    assert torch.equal(quant.dequantize(twin[0]), quant.dequantize(src[0]))
    assert torch.equal(twin[0].weight.data.view(torch.int32), src[0].weight.data.view(torch.int32))
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(twin(x), src(x))
    assert quant.state_tensors(twin[0])[0] == quant.state_tensors(src[0])[0]  # shape, dtype, blocksize, nesting
    with torch.device("meta"):
        wrong = nn.Sequential(nn.Linear(64, 64, bias=False))
    with pytest.raises(ValueError, match="0: rank 0 has a 4-bit layer here"):
        quant.make_4bit_twin_(wrong, spec)
