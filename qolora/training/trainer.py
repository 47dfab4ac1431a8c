"""Trainer setup: transformers' Trainer with checkpointing, paged optimizers and our data."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..config import Config
from .callbacks import MetricsCallback
from .tokenize import Collator

logger = logging.getLogger(__name__)


def resolve_optimizer(name: str, on_cuda: bool) -> str:
    """"auto" is paged AdamW 8-bit on CUDA and torch AdamW on CPU (paged optimizers need CUDA)."""
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
    from transformers import Trainer, TrainingArguments

    on_cuda = torch.cuda.is_available()
    t = cfg.train
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)
    args = TrainingArguments(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
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
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if eval_examples else "no",
        eval_steps=t.eval_steps,
        eval_on_start=bool(eval_examples) and eval_on_start,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=Collator(pad),
        callbacks=[MetricsCallback(t.output_dir, extra_metrics)],
    )
