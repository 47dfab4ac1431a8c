"""The one loss: summed next-token cross-entropy over the label tokens, and their count
(``token_loss_sum``), which training, the training eval and ``qolora eval`` all divide the same
way: token-weighted (docs/design.md, invariant 12).

Chunked cross-entropy computes it without the full [tokens, vocab] logits. A 32k-token sequence
with a 128k vocabulary has 16 GiB of fp32 logits. Here lm_head and the cross-entropy run chunk by
chunk in forward, keep nothing but the inputs, and are recomputed chunk by chunk in backward, so
memory is one chunk's logits (about 0.5 GiB at 1024 rows).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class ChunkedLMHeadCE(torch.autograd.Function):
    """sum over valid rows of CE(hidden @ weightᵀ, labels), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden: (N, H) compute dtype; weight: (V, H); labels: (N,) with -100 ignored
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            y = labels[s : s + chunk]
            valid = y != IGNORE
            if not bool(valid.any()):
                continue
            logits = (hidden[s : s + chunk] @ weight.T).float()  # (c, V), as lm_head then .float()
            target = logits.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
            total += ((torch.logsumexp(logits, -1) - target) * valid).sum()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            y = labels[s : s + ctx.chunk]
            valid = y != IGNORE
            if not bool(valid.any()):
                continue
            h = hidden[s : s + ctx.chunk]
            p = torch.softmax((h @ weight.T).float(), -1)  # (c, V) recomputed
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, y.clamp_min(0)] -= 1.0
            p *= (valid.to(p.dtype) * grad)[:, None]
            if need_h:
                gh[s : s + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                gw += p.T @ h.float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None


def chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed next-token CE over rows whose label is not -100.

    Args:
        hidden: (N, H) final hidden states (already shifted to align with ``labels``).
        weight: (V, H) lm_head weight.
        labels: (N,) target ids, -100 where no loss is taken.
    """
    return ChunkedLMHeadCE.apply(hidden, weight, labels, chunk)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PeftModel (or the model itself), through a DDP wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(inner, "lm_head") else model


def supports_chunked_ce(lm: nn.Module) -> bool:
    """A plain bias-free lm_head on ``lm.model``'s last hidden state, no logit soft-capping, and a
    forward that can skip the full logits (``logits_to_keep``)."""
    head = getattr(lm, "lm_head", None)
    cfg = getattr(lm, "config", None)
    return (
        isinstance(head, nn.Linear)
        and head.bias is None
        and hasattr(lm, "model")
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
        and "logits_to_keep" in inspect.signature(lm.forward).parameters
    )


def final_hidden(model: nn.Module, lm: nn.Module, fwd: dict[str, Any]) -> torch.Tensor:
    """``lm.model``'s last hidden state, from a forward through ``model`` itself.

    Note:
        The forward goes through ``model`` (a DDP wrapper) and not
        ``lm.model`` directly: DDP all-reduces gradients only after a forward through it, and a
        forward around it would leave every rank with its own gradients. ``logits_to_keep=1``
        keeps lm_head to one position per row; the loss then runs chunked on the hidden state.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured["hidden"] = output[0]

    handle = lm.model.register_forward_hook(keep)
    try:
        model(**fwd, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["hidden"]


def token_loss_sum(
    model: nn.Module, inputs: dict[str, torch.Tensor], ce_chunk: int | None = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE over the label tokens (label != -100) of a batch, and their count.

    ``model`` is a causal LM, a PeftModel or a DDP wrapper of one; ``inputs`` holds ``input_ids``
    and ``labels``, and ``attention_mask`` or (packs) ``position_ids``. With ``ce_chunk`` and a
    plain lm_head the CE runs chunked on the final hidden state; else on the full logits.
    """
    lm = causal_lm(model)
    labels = inputs["labels"][:, 1:]
    # packs: position_ids and no mask, from which transformers builds the block-diagonal mask;
    # it does so only without a KV cache, which a model with use_cache on would create here
    fwd = {k: inputs.get(k) for k in ("input_ids", "attention_mask", "position_ids")} | {"use_cache": False}
    if ce_chunk and supports_chunked_ce(lm):
        hidden = final_hidden(model, lm, fwd)
        total = chunked_ce_sum(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), lm.lm_head.weight, labels.reshape(-1), ce_chunk
        )
    else:
        logits = model(**fwd).logits
        total = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
    return total, (labels != IGNORE).sum()
