"""Chunked cross-entropy and activation offloading: same loss and gradients as the plain path."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qolora.training import train
from qolora.training.losses import chunked_ce_sum

from .conftest import tiny_train_config


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_ce_matches_full_ce(dtype, tol) -> None:
    N, H, V = 37, 16, 50
    h = torch.randn(N, H, dtype=dtype, requires_grad=True)
    W = (0.3 * torch.randn(V, H)).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[::5] = -100
    full = F.cross_entropy((h @ W.T).float(), y, ignore_index=-100, reduction="sum")
    gh_full, gw_full = torch.autograd.grad(full, (h, W))
    chunked = chunked_ce_sum(h, W, y, chunk=8)
    gh, gw = torch.autograd.grad(chunked, (h, W))
    assert torch.allclose(chunked, full, rtol=tol, atol=tol)
    assert torch.allclose(gh.float(), gh_full.float(), rtol=tol, atol=tol)
    assert torch.allclose(gw.float(), gw_full.float(), rtol=tol, atol=tol)


def test_chunked_ce_never_builds_full_logits(monkeypatch) -> None:
    N, H, V, chunk = 64, 8, 30, 16
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H)
    y = torch.randint(0, V, (N,))
    biggest = 0
    orig = torch.Tensor.float

    def spy(self, *a, **k):
        nonlocal biggest
        if self.ndim == 2 and self.shape[-1] == V:
            biggest = max(biggest, self.shape[0])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "float", spy)
    chunked_ce_sum(h, W, y, chunk=chunk).backward()
    assert biggest == chunk


def _history(chat_model_dir, tmp_path, name, **kw):
    cfg = tiny_train_config(chat_model_dir, tmp_path / name, max_steps=4, save_steps=4, eval_steps=4, **kw)
    train(cfg)
    m = json.loads((tmp_path / name / "run" / "metrics.json").read_text())
    return [h["loss"] for h in m["history"]], [e["eval_loss"] for e in m["eval"]]


def test_training_losses_match_with_chunked_ce_and_offload(chat_model_dir, tmp_path) -> None:
    for d in ("plain", "chunked", "offload", "accum_plain", "accum_chunked"):
        (tmp_path / d).mkdir()
    plain = _history(chat_model_dir, tmp_path, "plain", chunked_ce=False)
    chunked = _history(chat_model_dir, tmp_path, "chunked", chunked_ce=True, ce_chunk=5)
    offload = _history(chat_model_dir, tmp_path, "offload", chunked_ce=True, ce_chunk=5, offload_activations=True)
    for a, b in ((plain, chunked), (plain, offload)):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == pytest.approx(b[1], abs=1e-4)
    acc_plain = _history(chat_model_dir, tmp_path, "accum_plain", chunked_ce=False, grad_accum=2)
    acc_chunk = _history(chat_model_dir, tmp_path, "accum_chunked", chunked_ce=True, ce_chunk=5, grad_accum=2)
    assert acc_plain[0] == pytest.approx(acc_chunk[0], abs=1e-4)
