"""Chunked cross-entropy: the LM-head loss without the full [tokens, vocab] logits.

A 32k-token sequence with a 128k vocabulary has 16 GiB of fp32 logits. Here lm_head and the
cross-entropy run chunk by chunk in forward, keep nothing but the inputs, and are recomputed
chunk by chunk in backward, so memory is one chunk's logits (about 0.5 GiB at 1024 rows).
"""

from __future__ import annotations

import torch

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
