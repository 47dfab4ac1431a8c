"""Same results on every device: bitsandbytes' packed CPU eval path stays off, the base never
moves (docs/design.md, invariant 9), and the kernel self-check catches a wrong 4-bit path (invariant 10).

The tests marked ``needs_avx512bf16`` guard against the repacking that bitsandbytes 0.50.2 does
only on CPUs with AVX512-BF16; elsewhere they would pass without proving anything, so they skip
and say why.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import qolora
from qolora import quant
from qolora.export import export_merged
from qolora.quant import KernelCheckError, check_kernel, check_layer

from .conftest import add_trainer_callback, logits, perturb_lora_, tiny_train_config

needs_avx512bf16 = pytest.mark.skipif(
    not quant.cpu_packing_available(),
    reason="bitsandbytes reports no AVX512-BF16 on this CPU: its packed eval path, which this test guards "
    "against, cannot trigger here",
)


def _model(base_dir, r=4):
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights="olora")
    return qolora.get_qolora_model(quant.load_quantized(base_dir), cfg, progress=False)


def _bases(model) -> dict[str, torch.Tensor]:
    return {n: quant.dequantize(m) for n, m in model.named_modules() if quant.is_4bit(m)}


def _assert_same_bases(before, after) -> None:
    assert before.keys() == after.keys()
    moved = {n: float((after[n] - before[n]).abs().max()) for n in before}
    assert max(moved.values()) == 0.0, {n: v for n, v in moved.items() if v}


@needs_avx512bf16
def test_eval_state_dict_train_eval_keeps_the_base_bit_identical(llama_dir, tokens) -> None:
    model = perturb_lora_(_model(llama_dir))
    before = _bases(model)
    first = logits(model, tokens)  # eval mode, no grad: where bitsandbytes would repack
    model.state_dict()  # where it would convert back, re-quantizing absmax
    model.train()
    x = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    out = model(inputs_embeds=x).logits
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the packed path returns no input gradient
    assert (out.detach() - first).abs().max() <= 1e-5  # train and eval forwards are the same math
    assert torch.equal(logits(model, tokens), first)
    _assert_same_bases(before, _bases(model))
    assert not any(quant.is_repacked(m) for m in model.modules())


@needs_avx512bf16
def test_export_parity_after_an_eval_pass(base_copy, tmp_path, tokens) -> None:
    model = perturb_lora_(_model(base_copy), 0.05)
    want = logits(model, tokens)  # an eval pass before the save
    qolora.save_adapter(model, tmp_path / "a")
    export_merged(tmp_path / "a", tmp_path / "m", dtype="float32", progress=False)
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32), tokens)
    assert (got - want).abs().max() <= 1e-4


@needs_avx512bf16
def test_training_with_evals_and_saves_keeps_the_base(chat_model_dir, tmp_path, monkeypatch) -> None:
    """Eval on start, evals between checkpoint saves: the trained base equals the initial one."""
    from transformers import TrainerCallback

    import qolora.training.run as run

    seen = {}

    class Grab(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            seen["bases"] = _bases(model)

    add_trainer_callback(monkeypatch, Grab())
    run.train(tiny_train_config(chat_model_dir, tmp_path, max_steps=5, save_steps=2, eval_steps=2))
    initial = qolora.load_adapter(tmp_path / "run" / "initial_adapter", progress=False)
    _assert_same_bases(_bases(initial), seen["bases"])


def test_every_loaded_4bit_layer_has_the_packed_path_off(llama_dir) -> None:
    model = quant.load_quantized(llama_dir)
    layers = [m for m in model.modules() if quant.is_4bit(m)]
    assert len(layers) == 14 and all(m.support_avx512bf16_for_cpu is False for m in layers)


def test_kernel_check_passes_fast_on_a_correct_layer(llama_dir) -> None:
    model = _model(llama_dir)
    result = check_kernel(model)
    assert result is not None and result.layer == "base_model.model.model.layers.0.self_attn.q_proj"
    assert result.device == "cpu" and result.seconds < 2.0
    assert set(result.errors) == {"eval out", "train out", "input grad"}
    assert max(result.errors.values()) <= result.tolerance


@needs_avx512bf16
def test_kernel_check_catches_bitsandbytes_repacking(llama_dir) -> None:
    """Today's bug, turned back on: the check stops it with one line naming layer and device."""
    model = _model(llama_dir)
    for m in model.modules():
        if quant.is_4bit(m):
            m.support_avx512bf16_for_cpu = True
    with pytest.raises(KernelCheckError) as e:
        check_kernel(model)
    msg = str(e.value)
    assert "\n" not in msg and "layers.0.self_attn.q_proj" in msg and "on cpu" in msg
    assert "repacked" in msg


class _Wrong(torch.nn.Module):
    """A stand-in for a broken kernel: the real 4-bit layer, off by ``err`` or without a gradient."""

    def __init__(self, layer: torch.nn.Module, err: float = 0.0, detach: bool = False) -> None:
        super().__init__()
        self.layer, self.err, self.detach = layer, err, detach
        self.weight, self.bias, self.compute_dtype = layer.weight, layer.bias, layer.compute_dtype

    def forward(self, x):
        if self.detach:  # the output is right, the gradient to the input is zero
            return self.layer(x.detach()) + 0 * x
        return self.layer(x) * (1 + self.err)


@pytest.mark.parametrize(
    "err,detach,what",
    [(1e-3, False, "eval out relative error 1.0e-03"), (0.0, True, "input grad relative error 1.0e\\+00")],
)
def test_kernel_check_catches_a_wrong_output_or_a_lost_gradient(llama_dir, err, detach, what) -> None:
    layer = next(m for m in quant.load_quantized(llama_dir).modules() if quant.is_4bit(m))
    with pytest.raises(KernelCheckError, match=what):
        check_layer("model.layers.0.self_attn.q_proj", _Wrong(layer, err, detach))


def test_training_records_the_kernel_check_and_can_skip_it(chat_model_dir, tmp_path) -> None:
    from qolora.training import train

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train(tiny_train_config(chat_model_dir, tmp_path / "a", max_steps=1))
    check = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())["kernel_check"]
    assert check["device"] == "cpu" and check["errors"]["input grad"] <= check["tolerance"]
    train(tiny_train_config(chat_model_dir, tmp_path / "b", max_steps=1, kernel_check=False))
    assert json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())["kernel_check"] is None
