"""Trainer setup: transformers' Trainer with checkpointing, paged optimizers and our data."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from .._io import disk_full_as_one_line
from ..config import Config, ConfigError
from . import run_dir
from .callbacks import MetricsCallback
from .guard import DivergenceGuard, GuardState
from .losses import IGNORE, chunked_ce_sum
from .lr import resolve_lr
from .tokenize import Collator

logger = logging.getLogger(__name__)


def check_report_to(name: str) -> str:
    """``name`` if its package is installed; else one ConfigError line saying what to install."""
    if name != "none" and importlib.util.find_spec(name) is None:
        raise ConfigError(f"train.report_to={name}: the {name} package is not installed; pip install 'qolora[{name}]'")
    return name


def resolve_optimizer(name: str, on_cuda: bool) -> str:
    """ "auto" is paged AdamW 8-bit on CUDA and torch AdamW on CPU (paged optimizers need CUDA)."""
    if name == "auto":
        chosen = "paged_adamw_8bit" if on_cuda else "adamw_torch"
        why = "CUDA: paged 8-bit states" if on_cuda else "CPU: bitsandbytes' paged optimizers need CUDA"
    else:
        chosen, why = name, "set explicitly"
        if name.startswith("paged_") and not on_cuda:
            raise ValueError(f"train.optimizer: {name} needs a CUDA GPU; use adamw_torch or auto on CPU")
    logger.info("optimizer %s (%s)", chosen, why)
    return chosen


def prepare_for_training_(model: nn.Module, gradient_checkpointing: bool) -> None:
    """Freeze the base, turn the KV cache off and enable non-reentrant checkpointing, in place.

    Unlike PEFT's ``prepare_model_for_kbit_training`` this does not upcast embeddings and
    lm_head to fp32 (2 GB for a 128k-vocab 8B model).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


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


def grad_norm(model: nn.Module) -> float:
    """The 2-norm of every trainable parameter's gradient (all-reduced already under DDP)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class QoloraTrainer(Trainer):
    """Trainer whose loss is chunked cross-entropy, whose saved activations can live on the CPU,
    and whose eval loss is token-weighted (as ``qolora eval``), not a mean of batch means.

    Its checkpoints are sealed once complete (``run_dir``), a full disk while writing one is one
    line, and a ``DivergenceGuard`` (if given) checks each optimizer step before it is applied.
    """

    def __init__(
        self,
        *args: Any,
        ce_chunk: int | None = None,
        offload_activations: bool = False,
        guard: DivergenceGuard | None = None,
        keep_checkpoints: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ce_chunk, self.offload = ce_chunk, offload_activations
        self.guard, self.keep_checkpoints = guard, keep_checkpoints
        self._step_loss: torch.Tensor | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
        """One micro-batch; on the last of an optimizer step, the guard sees the step's loss (the
        mean over ranks, as logged) and gradient norm before the optimizer applies it."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is None:
            return loss
        self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        if self.accelerator.sync_gradients:
            from .. import distributed

            w = distributed.world()
            (step_loss,) = distributed.all_reduce_sum([float(self._step_loss)], w, loss.device)
            self._step_loss = None
            # with fp16 loss scaling an inf gradient is an overflow the scaler skips, not a divergence
            norm = None if self.args.fp16 else grad_norm(model)
            self.guard.observe(self.state.global_step + 1, step_loss / w.size, norm)
        return loss

    def checkpoint_bytes(self, out: Path) -> int:
        """About what a checkpoint needs on disk: the trainable weights, the optimizer state, 1 MiB of
        JSON and RNG state; or the last sealed checkpoint's size if larger."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        opt = 0
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                opt += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
        last = max((run_dir.sealed_bytes(d) for _, d in run_dir.checkpoints(out)), default=0)
        return max(params + opt + 2**20, last)

    def _save_checkpoint(self, model, trial):  # noqa: ANN001
        """transformers' checkpoint, then its seal and the rotation (``run_dir``); none while the
        divergence guard suspects a blow-up; a full disk is one line and leaves no partial checkpoint."""
        from .. import distributed

        out = Path(self.args.output_dir)
        ckpt = out / f"checkpoint-{self.state.global_step}"
        if self.guard is not None and self.guard.suspect:
            logger.warning(
                "not writing %s: the smoothed loss %.4g is above its bound %.4g (divergence guard); the last "
                "checkpoint stays the latest",
                ckpt.name,
                self.guard.ema,
                self.guard.bound(),
            )
            return
        w = distributed.world()
        need = self.checkpoint_bytes(out)
        try:
            with disk_full_as_one_line(f"checkpoint {ckpt.name}", ckpt, need):
                super()._save_checkpoint(model, trial)
                distributed.barrier(w)  # every rank's files (its RNG state) are in before the seal
                if w.is_main:
                    run_dir.seal(ckpt)
        except BaseException:
            if w.is_main:
                import shutil

                shutil.rmtree(ckpt, ignore_errors=True)  # nothing that looks like a checkpoint is left
            raise
        if w.is_main and self.keep_checkpoints:
            run_dir.rotate(out, self.keep_checkpoints)

    def loss_sum(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token CE over the label tokens, and their count."""
        lm = causal_lm(model)
        labels = inputs["labels"][:, 1:]
        # packs: position_ids and no mask, from which transformers builds the block-diagonal mask;
        # it does so only without a KV cache, which a model with use_cache on would create here
        fwd = {k: inputs.get(k) for k in ("input_ids", "attention_mask", "position_ids")} | {"use_cache": False}
        if self.ce_chunk and supports_chunked_ce(lm):
            hidden = final_hidden(model, lm, fwd)
            total = chunked_ce_sum(
                hidden[:, :-1].reshape(-1, hidden.shape[-1]), lm.lm_head.weight, labels.reshape(-1), self.ce_chunk
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        offload = (
            torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            if self.offload and model.training
            else contextlib.nullcontext()
        )
        if not self.ce_chunk or not supports_chunked_ce(causal_lm(model)):
            with offload:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with offload:
            total, count = self.loss_sum(model, inputs)
        scale = 1
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # label tokens over the accumulated batches, and with average_tokens_across_devices over
            # every rank's batches too; DDP then averages the ranks' gradients, which the world-size
            # factor undoes, so the gradient is that of the global token-weighted mean (as transformers)
            count = num_items_in_batch
            if self.args.average_tokens_across_devices:
                scale = self.accelerator.num_processes
        loss = total / torch.as_tensor(count, device=total.device).clamp_min(1) * scale
        return (loss, {}) if return_outputs else loss

    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,  # noqa: ANN001
        metric_key_prefix="eval",
    ):
        """``<prefix>_loss`` = summed CE / label tokens over the whole eval set.

        With several processes each rank takes its share (``distributed.shard_batches``) and the
        sums are added over ranks: every example counts once (accelerate's even batches would
        repeat some); a rank with fewer examples runs weight-0 batches to keep the ranks in step.
        """
        from .. import distributed

        model = self._wrap_model(self.model, training=False, dataloader=dataloader)
        model.eval()
        w = distributed.world()
        if w.size == 1:
            batches: Any = ((b, 1) for b in dataloader)
        else:
            ds, bs = dataloader.dataset, self.args.per_device_eval_batch_size
            shard = distributed.shard_batches(len(ds), bs, w)  # an empty batch: weight 0, a stand-in example
            batches = ((self.data_collator([ds[i] for i in idx or [0]]), int(bool(idx))) for idx in shard)
        total, count, n = 0.0, 0, 0
        with torch.no_grad():
            for inputs, weight in batches:
                inputs = self._prepare_inputs(inputs)
                with self.compute_loss_context_manager():
                    s, c = self.loss_sum(model, inputs)
                total += weight * float(s)
                count += weight * int(c)
                n += weight * inputs["input_ids"].shape[0]
        device = next(self.model.parameters()).device
        total, count, n = distributed.all_reduce_sum([total, count, n], w, device)
        metrics = {f"{metric_key_prefix}_loss": total / max(count, 1), f"{metric_key_prefix}_tokens": int(count)}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=int(n))


def build_trainer(
    model: nn.Module,
    tokenizer: Any,
    train_examples: list[dict[str, list[int]]],
    eval_examples: list[dict[str, list[int]]] | None,
    cfg: Config,
    extra_metrics: dict[str, Any] | None = None,
    eval_on_start: bool = True,
) -> Any:
    """A ``transformers.Trainer`` for a QOLoRA PeftModel; call ``.train()`` on it."""
    from transformers import TrainingArguments

    on_cuda = torch.cuda.is_available()
    t = cfg.train
    lr, why = resolve_lr(t.lr, cfg.adapter.init, cfg.adapter.r, cfg.adapter.alpha)
    logger.info("learning rate %g (%s)", lr, why)
    extra_metrics = {**(extra_metrics or {}), "lr": {"value": lr, "why": why}}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)
    args = TrainingArguments(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_ratio,
        optim=resolve_optimizer(t.optimizer, on_cuda),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # QOLoRA rotates, counting sealed checkpoints only (run_dir.rotate)
        eval_strategy="steps" if eval_examples else "no",
        eval_steps=t.eval_steps,
        eval_on_start=bool(eval_examples) and eval_on_start,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        report_to=check_report_to(t.report_to),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        length_column_name="length",  # written by the tokenizing map: no pass over the data to measure
        include_num_input_tokens_seen="all" if cfg.data.packing else "non_padding",  # packs have no padding
        prediction_loss_only=True,
        logging_nan_inf_filter=False,  # a non-finite loss is logged as it is, never averaged away
        disable_tqdm=False,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: no extra graph traversal
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = getattr(model.get_output_embeddings(), "out_features", None)  # a uniform guess's loss is ln(vocab)
    guard = (
        DivergenceGuard(t.divergence_factor, t.divergence_patience, math.log(vocab) if vocab else None)
        if t.divergence_check
        else None
    )
    extra_metrics["divergence_guard"] = guard.settings() if guard else None
    return QoloraTrainer(
        ce_chunk=t.ce_chunk if t.chunked_ce else None,
        offload_activations=t.offload_activations,
        guard=guard,
        keep_checkpoints=t.save_total_limit,
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=Collator(pad),
        callbacks=[MetricsCallback(t.output_dir, extra_metrics), GuardState(guard)],
    )
