"""The benchmark scripts' code paths run (tiny shapes, CPU); GPU-only checks are gated."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_7b_script_smoke_on_cpu() -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_7b.py", "--shapes", "tiny", "--device", "cpu", "--steps", "2", "--seq", "64"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = out.stdout.strip().splitlines()[-1]
    assert row.startswith("| tiny 4-bit, r=16, seq 64") and "tok/s" in row


@pytest.mark.gpu
@gpu
def test_cuda_init_keeps_settings_and_reload_is_exact(llama_dir, tmp_path) -> None:
    from peft import LoraConfig

    import qolora
    from qolora import quant

    cfg = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora")
    model = qolora.get_qolora_model(quant.load_quantized(llama_dir, compute_dtype="bfloat16"), cfg, progress=False)
    layers = [m for m in model.modules() if quant.is_4bit(m)]
    assert all(m.weight.device.type == "cuda" and quant.quant_settings(m).dtype == torch.bfloat16 for m in layers)
    assert model.qolora_states["default"].report.sources() == {"checkpoint": 14}
    x = torch.randint(0, 128, (1, 16), device="cuda")
    with torch.no_grad():
        want = model(input_ids=x).logits
    qolora.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        got = qolora.load_adapter(tmp_path / "a", progress=False)(input_ids=x).logits
    assert torch.equal(got, want)
