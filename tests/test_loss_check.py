"""The loss is the model's own (docs/design.md, invariant 24): the chunked CE applies each family's
logit transform, forward and backward, and a transform nobody listed is caught on the first batch."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
import transformers

from qolora.training.losses import LogitTransform, check_loss, logit_transform, token_loss_sum
from qolora.training.run import train

from .conftest import tiny_train_config
from .model_matrix import FAMILIES, config

BY_NAME = {f.name: f for f in FAMILIES}


def _realistic(name: str) -> torch.nn.Module:
    """The family's tiny model with lm_head scaled so its logits span tens, as a trained model's do
    (a random tiny model's are near 0, where a wrong scale or cap hardly shows)."""
    model = getattr(transformers, BY_NAME[name].model)(config(BY_NAME[name])).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)
    return model


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt with no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["Granite", "Cohere", "Gemma2", "Llama", "GPT-NeoX"])
def test_the_chunked_loss_and_its_gradients_are_the_models_own(name) -> None:
    model, batch = _realistic(name), _batch()
    total, count = token_loss_sum(model, batch, ce_chunk=16)  # several chunks
    own = model(**batch, use_cache=False).loss
    assert abs(float(total / count) - float(own)) <= 1e-5 * max(1.0, abs(float(own))), (float(total / count), own)
    assert float(own) > 20.0  # realistic logits: far from ln(384) = 5.95
    got, want = _grads(model, total / count), _grads(model, model(**batch, use_cache=False).loss)
    assert got.keys() == want.keys() and len(got) > 10
    for k, g in want.items():
        assert torch.allclose(got[k], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), k
    check = check_loss(model, batch, 16)
    assert check is not None and check.ok


def test_negative_control_granite_without_its_scaling_fails_the_check(monkeypatch) -> None:
    model, batch = _realistic("Granite"), _batch()
    assert logit_transform(model) == LogitTransform(1 / 8.0, None)
    monkeypatch.setattr("qolora.training.losses.logit_transform", lambda lm: LogitTransform())
    check = check_loss(model, batch, 16)
    assert check is not None and not check.ok and check.chunked > 2 * check.own


def _scaled_logits(monkeypatch, factor: float = 3.0) -> None:
    """Llama whose forward multiplies its logits by ``factor``: a transform no config declares."""
    cls = transformers.LlamaForCausalLM
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, labels=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
        out = original(self, *args, **kwargs)
        out.logits = out.logits * factor
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, vocab_size=self.config.vocab_size)
        return out

    monkeypatch.setattr(cls, "forward", forward)


def test_a_logit_transform_nobody_listed_falls_back_to_the_models_own_loss(
    chat_model_dir, tmp_path, monkeypatch, caplog
) -> None:
    _scaled_logits(monkeypatch)
    with torch.no_grad():  # a unit check first: the full-logits path is the model's own loss
        model = transformers.AutoModelForCausalLM.from_pretrained(chat_model_dir)
        model.lm_head.weight.mul_(50.0)
        ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(4))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        total, count = token_loss_sum(model, batch, ce_chunk=None)
        assert abs(float(total / count) - float(model(**batch).loss)) < 1e-5
        assert not check_loss(model, batch, 1024).ok
    cfg = tiny_train_config(chat_model_dir, tmp_path, max_steps=2, save_steps=10, eval_steps=2)
    with caplog.at_level(logging.WARNING, logger="qolora"):
        train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    check = metrics["loss_check"]
    assert not check["ok"] and check["ce"] == "full logits" and abs(check["chunked"] - check["own"]) > 1e-3
    lines = [r.getMessage() for r in caplog.records if "train.chunked_ce" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "using the full logits" in lines[0]


def test_a_model_without_a_transform_keeps_the_chunked_loss(chat_model_dir, tmp_path) -> None:
    cfg = tiny_train_config(chat_model_dir, tmp_path, max_steps=2, save_steps=10, eval_steps=2)
    train(cfg)
    check = json.loads((tmp_path / "run" / "metrics.json").read_text())["loss_check"]
    assert check["ok"] and check["ce"] == "chunked" and check["tokens"] > 0
    assert abs(check["chunked"] - check["own"]) <= 1e-5 * max(1.0, check["own"])


def test_a_moe_router_auxiliary_loss_is_added_as_transformers_adds_it(tmp_path) -> None:
    """Mixtral with ``output_router_logits``: the training loss is transformers' own, CE plus
    ``router_aux_loss_coef`` x the load-balancing loss (the chunked CE, which cannot see the router
    logits, steps aside); without it, the chunked CE runs and equals the model's loss."""
    from qolora.training.losses import supports_chunked_ce

    from .conftest import make_tokenizer

    tok = make_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    kw |= dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for aux in (True, False):
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(output_router_logits=aux, **kw)).eval()
        assert supports_chunked_ce(model) is not aux
        with torch.no_grad():
            total, count = token_loss_sum(model, batch)
            out = model(**batch)
        assert abs(float(total / count) - float(out.loss)) < 1e-5
        assert (out.aux_loss is not None) is aux and (not aux or float(0.5 * out.aux_loss) > 0.1)
