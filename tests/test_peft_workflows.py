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
    before = _base(model)
    with pytest.warns(UserWarning, match="OLoRA changes the base weights"):  # PEFT's own warning, as on PEFT
        model.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    after = _base(model)
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


def _olora_model(model_dir):
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora", task_type="CAUSAL_LM")
    return qolora.get_qolora_model(quant.load_quantized(str(model_dir)), cfg, progress=False)


def _base(model) -> dict[str, torch.Tensor]:
    return {n: quant.dequantize(m) for n, m in model.named_modules() if quant.is_4bit(m)}


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


# the trainers' own arguments, the same for every client tested here (TRL's configs subclass these)
TRAIN_ARGS = {
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "report_to": "none",
    "use_cpu": True,
    "save_strategy": "no",
}
X = torch.tensor([[1, 7, 8, 9, 10, 11]])


def _eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def _check_reload(model, tmp_path) -> torch.Tensor:
    """save_adapter then load_adapter give bit-identical logits; returns the model's logits."""
    want = _eval_logits(model)
    back = qolora.load_adapter(qolora.save_adapter(model, tmp_path / "adapter"), progress=False)
    assert torch.equal(_eval_logits(back), want)
    return want


def test_trl_sft_trainer_trains_saves_reloads_exactly_and_exports(chat_model_dir, tmp_path) -> None:
    """TRL's SFTTrainer on a QOLoRA model: only the adapter moves, TRL leaves it in bf16 (also on the
    CPU), and save_adapter / load_adapter / export_merged give that model back."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from qolora.export import export_merged

    model = _olora_model(chat_model_dir)
    base, lora0 = _base(model), {n: p.detach().float().clone() for n, p in _lora(model).items()}
    words = ["hello", "python", "code", "model"]
    rows = Dataset.from_list([{"prompt": f"what is {w}", "completion": f" {w} is good"} for w in words * 4])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, **TRAIN_ARGS)
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok).train()
    after = _base(model)
    assert all(torch.equal(base[n], after[n]) for n in base)
    lora = _lora(model)
    assert {p.dtype for p in lora.values()} == {torch.bfloat16}  # what TRL does; the reload must keep it
    assert any(not torch.equal(lora0[n], p.detach().float()) for n, p in lora.items())
    want = _check_reload(model, tmp_path)
    export_merged(tmp_path / "adapter", tmp_path / "merged", dtype="float32", progress=False)
    got = _eval_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32))
    # the merge is exact in fp32; the trained model ran its bf16 adapter path in bf16
    assert (got - want).abs().max() <= 5e-3 * want.abs().max()  # measured 1.3e-3


def test_trl_dpo_trainer_with_its_reference_adapter(chat_model_dir, tmp_path) -> None:
    """TRL's DPOTrainer adds a frozen "ref" adapter with the policy's config (init "olora") and copies
    the weights into it: on a QOLoRA base that adapter gets the initial factors, never a second QR
    or a rewritten base; the trained adapter then saves and reloads exactly."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = _olora_model(chat_model_dir)
    base = _base(model)
    words = ["hello", "python", "code", "model"]
    rows = Dataset.from_list(
        [{"prompt": f"what is {w}", "chosen": f" {w} is good", "rejected": f" no {w}"} for w in words]
    )
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), bf16=False, **{**TRAIN_ARGS, "max_steps": 2})
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok).train()
    assert "ref" in model.peft_config
    after = _base(model)
    assert all(torch.equal(base[n], after[n]) for n in base)
    model.set_adapter("default")
    _check_reload(model, tmp_path)


def _tiny_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        x = torch.randint(6, 40, (2, 10), generator=g)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def test_a_plain_transformers_trainer_trains_and_reloads_exactly(chat_model_dir, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = _olora_model(chat_model_dir)
    lora0 = {n: p.detach().clone() for n, p in _lora(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path / "t"), remove_unused_columns=False, **TRAIN_ARGS)
    rows = [{k: v[i] for k, v in b.items()} for b in _tiny_batches() for i in range(2)]
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert any(not torch.equal(lora0[n], p) for n, p in _lora(model).items())
    _check_reload(model, tmp_path)


def test_a_hand_written_accelerate_loop_trains_and_reloads_exactly(chat_model_dir, tmp_path) -> None:
    from accelerate import Accelerator

    model = _olora_model(chat_model_dir)
    lora0 = {n: p.detach().clone() for n, p in _lora(model).items()}
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, opt = accelerator.prepare(model, opt)
    wrapped.train()
    for batch in _tiny_batches():
        accelerator.backward(wrapped(**batch).loss)
        opt.step()
        opt.zero_grad()
    model = accelerator.unwrap_model(wrapped)
    assert any(not torch.equal(lora0[n], p) for n, p in _lora(model).items())
    _check_reload(model, tmp_path)
