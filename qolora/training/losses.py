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
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
CE_CHUNK = 1024  # rows per chunk by default
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM does to ``lm_head``'s output before its loss: logits·``scale``, then, with a
    ``softcap`` c, c·tanh(logits / c). Cohere multiplies (``logit_scale``), Granite divides
    (``logits_scaling``), FalconH1 multiplies (``lm_head_multiplier``), Gemma 2 and 3 soft-cap
    (``final_logit_softcapping``). A family with another transform is caught by ``check_loss``."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """(c, V) float32 logits of lm_head → the model's logits."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def grad(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """d loss / d (lm_head output) from d loss / d (model's logits) ``g``, at lm_head output ``z``."""
        if self.softcap:
            g = g * (1 - torch.tanh(z * self.scale / self.softcap).square())
        return g * self.scale if self.scale != 1.0 else g


def logit_transform(lm: nn.Module) -> LogitTransform:
    """The logit transform ``lm``'s config declares (``LogitTransform``); identity if none is known."""
    cfg = getattr(lm, "config", None)
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "lm_head_multiplier", None) is not None:
        scale *= float(cfg.lm_head_multiplier)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return LogitTransform(scale, float(cap) if cap else None)


class ChunkedLMHeadCE(torch.autograd.Function):
    """sum over valid rows of CE(transform(hidden @ weightᵀ), labels), chunk by chunk."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, tf: LogitTransform
    ) -> torch.Tensor:
        # hidden: (N, H) compute dtype; weight: (V, H); labels: (N,) with -100 ignored
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            y = labels[s : s + chunk]
            valid = y != IGNORE
            if not bool(valid.any()):
                continue
            logits = tf.apply((hidden[s : s + chunk] @ weight.T).float())  # (c, V), as lm_head, .float(), transform
            target = logits.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
            total += ((torch.logsumexp(logits, -1) - target) * valid).sum()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk, ctx.tf = chunk, tf
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        hidden, weight, labels = ctx.saved_tensors
        tf: LogitTransform = ctx.tf
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            y = labels[s : s + ctx.chunk]
            valid = y != IGNORE
            if not bool(valid.any()):
                continue
            h = hidden[s : s + ctx.chunk]
            z = (h @ weight.T).float()  # (c, V) recomputed
            p = torch.softmax(tf.apply(z), -1)
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, y.clamp_min(0)] -= 1.0
            p *= (valid.to(p.dtype) * grad)[:, None]
            p = tf.grad(z, p)
            if need_h:
                gh[s : s + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                gw += p.T @ h.float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None


def chunked_ce_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 1024,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """Summed next-token CE over rows whose label is not -100.

    Args:
        hidden: (N, H) final hidden states (already shifted to align with ``labels``).
        weight: (V, H) lm_head weight.
        labels: (N,) target ids, -100 where no loss is taken.
        transform: what the model does to lm_head's output (``logit_transform``); default none.
    """
    return ChunkedLMHeadCE.apply(hidden, weight, labels, chunk, transform or LogitTransform())


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PeftModel (or the model itself), through a DDP wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(inner, "get_output_embeddings") else model


def lm_head(lm: nn.Module) -> nn.Module | None:
    """The causal LM's output layer (``lm_head``; GPT-NeoX's ``embed_out``)."""
    get = getattr(lm, "get_output_embeddings", None)
    return get() if get is not None else getattr(lm, "lm_head", None)


def lm_body(lm: nn.Module) -> nn.Module | None:
    """The decoder under the head, whose first output is the final hidden state: ``lm.model``,
    GPT-2's and Falcon's ``transformer``, GPT-NeoX's ``gpt_neox`` (transformers' ``base_model_prefix``)."""
    body = getattr(lm, getattr(lm, "base_model_prefix", "") or "model", None)
    return body if isinstance(body, nn.Module) and body is not lm else None


def supports_chunked_ce(lm: nn.Module) -> bool:
    """A plain bias-free output layer on the body's last hidden state (``lm_head``, ``lm_body``) and a
    forward that can skip the full logits (``logits_to_keep``). The logit transform comes from
    ``logit_transform``; that the result is the model's own loss is checked on a real batch by
    ``check_loss``."""
    head = lm_head(lm)
    return (
        isinstance(head, nn.Linear)
        and head.bias is None
        and lm_body(lm) is not None
        and "logits_to_keep" in inspect.signature(lm.forward).parameters
        and not router_aux_coef(lm)  # the auxiliary loss needs the same forward's router logits
    )


def router_aux_coef(lm: nn.Module) -> float:
    """A MoE model's router auxiliary-loss weight when its config turns the loss on
    (``output_router_logits``), as transformers adds it to the loss; else 0."""
    c = getattr(lm, "config", None)
    return float(getattr(c, "router_aux_loss_coef", 0.0) or 0.0) if getattr(c, "output_router_logits", False) else 0.0


def final_hidden(model: nn.Module, lm: nn.Module, fwd: dict[str, Any]) -> torch.Tensor:
    """The body's (``lm_body``) last hidden state, from a forward through ``model`` itself.

    Note:
        The forward goes through ``model`` (a DDP wrapper) and not
        the body directly: DDP all-reduces gradients only after a forward through it, and a
        forward around it would leave every rank with its own gradients. ``logits_to_keep=1``
        keeps lm_head to one position per row; the loss then runs chunked on the hidden state.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured["hidden"] = output[0]

    handle = lm_body(lm).register_forward_hook(keep)
    try:
        model(**fwd, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["hidden"]


def token_loss_sum(
    model: nn.Module, inputs: dict[str, torch.Tensor], ce_chunk: int | None = CE_CHUNK
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
            hidden[:, :-1].reshape(-1, hidden.shape[-1]),
            lm_head(lm).weight,
            labels.reshape(-1),
            ce_chunk,
            logit_transform(lm),
        )
    else:
        out = model(**fwd)
        logits = out.logits
        total = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        coef = router_aux_coef(lm)
        if coef and getattr(out, "aux_loss", None) is not None:  # transformers' loss: CE + coef x aux, per batch
            total = total + coef * out.aux_loss.float() * (labels != IGNORE).sum()
    return total, (labels != IGNORE).sum()


@dataclass
class LossCheck:
    """The chunked CE against the model's own transformers loss, on one real batch (token-weighted means)."""

    chunked: float
    own: float
    tokens: int
    tol: float
    model_type: str | None

    @property
    def ok(self) -> bool:
        return abs(self.chunked - self.own) <= self.tol * max(1.0, abs(self.own))

    def to_dict(self) -> dict[str, Any]:
        return {"chunked": self.chunked, "own": self.own, "tokens": self.tokens, "tol": self.tol, "ok": self.ok}


def check_loss(model: nn.Module, batch: dict[str, torch.Tensor], ce_chunk: int | None) -> LossCheck | None:
    """The chunked CE's mean on ``batch`` against the model's own loss (``model(..., labels=...)``).

    As the kernel check trusts a 4-bit layer only after it matched its fp32 twin, the chunked CE is
    trusted only after it matched the model's own loss on a real batch: a logit transform nobody
    listed (``logit_transform``) shows up here. Runs in eval mode (no dropout) without gradients;
    under FSDP every rank must call it (the forward is a collective). None when the chunked CE is
    not used (off, or a head it cannot run), so the model's own loss is used anyway.

    Note:
        The tolerance is relative: 1e-5 when lm_head computes in fp32, 2e-2 in half precision,
        where the model applies its transform to bf16 / fp16 logits and the chunked CE to fp32 ones.
    """
    lm = causal_lm(model)
    if not ce_chunk or not supports_chunked_ce(lm):
        return None
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, count = token_loss_sum(model, batch, ce_chunk)
            own = model(**fwd, labels=batch["labels"], use_cache=False).loss
    finally:
        model.train(was)
    tol = 1e-5 if lm_head(lm).weight.dtype == torch.float32 else 2e-2
    mean = float(total) / max(int(count), 1)
    return LossCheck(mean, float(own), int(count), tol, getattr(lm.config, "model_type", None))


def verified_ce_chunk(
    model: nn.Module, batch: dict[str, torch.Tensor], ce_chunk: int | None
) -> tuple[int | None, LossCheck | None]:
    """``ce_chunk`` if the chunked CE matched the model's own loss on ``batch`` (``check_loss``), else
    None (full logits: the model's own loss), with one warning line naming the config key."""
    check = check_loss(model, batch, ce_chunk)
    if check is None or check.ok:
        return ce_chunk, check
    logger.warning(
        "train.chunked_ce: the chunked loss %.6g differs from the model's own %.6g on the first batch (%s, %d "
        "tokens, tolerance %g): the model transforms its logits in a way QOLoRA does not know; using the full "
        "logits instead (more memory)",
        check.chunked,
        check.own,
        check.model_type,
        check.tokens,
        check.tol,
    )
    return None, check
