"""Trainer setup: transformers' Trainer with checkpointing, paged optimizers and our data."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from ..config import Config
from .callbacks import MetricsCallback
from .harness import RunHarness, common_args, make_guard
from .losses import causal_lm, supports_chunked_ce, token_loss_sum, verified_ce_chunk
from .tokenize import Collator

logger = logging.getLogger(__name__)


def prepare_for_training_(model: nn.Module, gradient_checkpointing: bool) -> None:
    """Freeze the base, turn the KV cache off and enable non-reentrant checkpointing, in place.

    Unlike PEFT's ``prepare_model_for_kbit_training`` this does not upcast embeddings and
    lm_head to fp32 (2 GB for a 128k-vocab 8B model).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


class QoloraTrainer(RunHarness, Trainer):
    """The SFT trainer: transformers' Trainer whose loss is chunked cross-entropy (checked against
    the model's own on the first batch), whose saved activations can live on the CPU, and whose eval
    loss is token-weighted (as ``qolora eval``), not a mean of batch means; on the run harness.
    """

    def __init__(
        self, *args: Any, ce_chunk: int | None = None, offload_activations: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ce_chunk, self.offload = ce_chunk, offload_activations
        self.loss_checked = False  # the chunked CE is trusted after it matched the model's own loss (check_loss_once)

    def check_loss_once(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        """On the first batch the trainer computes a loss on (the step-0 eval's or the first step's),
        the chunked CE is compared with the model's own loss (``losses.check_loss``); if any rank's
        differs, every rank uses the full logits from then on, said in one line. Both figures go to
        ``metrics.json`` (``loss_check``).

        Note:
            It runs inside the Trainer, on the model as wrapped for training: an FSDP2 model's first
            forward must come after accelerate has prepared it, and every rank takes part.
        """
        if self.loss_checked:
            return
        self.loss_checked = True
        from .. import distributed

        _, check = verified_ce_chunk(model, inputs, self.ce_chunk)
        if check is None:
            return
        checks = distributed.all_gather(check, distributed.world())
        if any(not c.ok for c in checks):
            self.ce_chunk, check = None, next(c for c in checks if not c.ok)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, MetricsCallback):
                cb.extra["loss_check"] = {**check.to_dict(), "ce": "chunked" if self.ce_chunk else "full logits"}

    def loss_sum(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token CE over the label tokens, and their count (``losses.token_loss_sum``)."""
        self.check_loss_once(model, inputs)
        return token_loss_sum(model, inputs, self.ce_chunk)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        self.check_loss_once(model, inputs)
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
    """The SFT trainer for a QOLoRA PeftModel; call ``.train()`` on it."""
    from transformers import TrainingArguments

    t = cfg.train
    common, extra_metrics = common_args(model, cfg, bool(eval_examples), eval_on_start, extra_metrics)
    args = TrainingArguments(
        **common,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        length_column_name="length",  # written by the tokenizing map: no pass over the data to measure
        include_num_input_tokens_seen="all" if cfg.data.packing else "non_padding",  # packs have no padding
        prediction_loss_only=True,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = getattr(model.get_output_embeddings(), "out_features", None)  # a uniform guess's loss is ln(vocab)
    guard = make_guard(t, uniform_loss=math.log(vocab) if vocab else None)
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
        callbacks=[MetricsCallback(t.output_dir, extra_metrics)],
    )
