"""Trainer setup: transformers' Trainer with checkpointing, paged optimizers and our data."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from .._io import disk_full_as_one_line
from ..config import Config, ConfigError
from . import run_dir
from .callbacks import MetricsCallback
from .guard import DivergenceGuard, RunState
from .losses import causal_lm, supports_chunked_ce, token_loss_sum, verified_ce_chunk
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
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def grad_norm(model: nn.Module) -> float:
    """The 2-norm of every trainable parameter's gradient (all-reduced already under DDP). Under
    FSDP each rank sums the squares of its gradient shards and one all-reduce adds them up: the
    shards are disjoint, so nothing is gathered whole."""
    from torch.distributed.tensor import DTensor

    plain, shards = [], []
    for p in model.parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            shards.append(p.grad.to_local().float().pow(2).sum())
        else:
            plain.append(torch.linalg.vector_norm(p.grad.float()).pow(2))
    total = torch.stack(plain).sum() if plain else torch.zeros(())
    if shards:
        local = torch.stack(shards).sum()
        torch.distributed.all_reduce(local)  # every rank holds sharded gradients, so every rank joins
        total = total.to(local.device) + local
    return float(total.sqrt())


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
        self.unverified: Path | None = None  # the newest checkpoint, until the next step's loss is seen
        self.save_deferred = False  # a save a suspect step held back
        self.loss_checked = False  # the chunked CE is trusted after it matched the model's own loss (check_loss_once)
        self.run_state = RunState(guard)
        self.run_state.trainer = self
        self.add_callback(self.run_state)
        from .. import fsdp

        self.sharded = fsdp.is_sharded(self.model)  # FSDP2: checkpoints hold whole, gathered states

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter as transformers saves it; an FSDP model's is first gathered whole from its shards."""
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        from .. import fsdp

        state = fsdp.full_trainable_state(self.model)  # a collective: every rank takes part
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP the optimizer state is gathered whole, keyed by parameter name (torch's full
        optimizer state dict), so no rank's slice is lost and the file does not depend on the world size."""
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        from .. import fsdp

        state = fsdp.full_optimizer_state(self.model, _inner(self.optimizer))
        if self.args.should_save:
            torch.save(state, Path(output_dir) / OPTIMIZER_NAME)
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.sharded:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        from .. import fsdp

        state = torch.load(Path(checkpoint) / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        fsdp.load_full_optimizer_state(self.model, _inner(self.optimizer), state)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """A checkpoint's adapter into the model; an FSDP model's shards take their part of it."""
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        from .. import fsdp

        name = self.model.active_adapter
        path = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        saved = load_file(str(path))
        # PEFT's files drop the adapter name from each key: put it back to get the parameter names
        ours = {n.replace(f".{name}.", "."): n for n, p in self.model.named_parameters() if p.requires_grad}
        fsdp.load_full_trainable_state(self.model, {ours.get(k, k): v for k, v in saved.items()}, str(path))

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
            try:
                self.guard.observe(self.state.global_step + 1, step_loss / w.size, norm)
            finally:
                self.verify_checkpoint()
        return loss

    def verify_checkpoint(self) -> None:
        """The newest checkpoint, written at the end of the last step, is judged by this step's loss
        (the first computed with its weights): a suspect one is set aside as ``checkpoint-N.diverged``;
        a good one counts, and the oldest beyond ``keep_checkpoints`` are deleted."""
        from .. import distributed

        ckpt, self.unverified = self.unverified, None
        if ckpt is None or not distributed.world().is_main:
            return
        if self.guard is not None and self.guard.suspect:
            aside = run_dir.set_aside(ckpt, "diverged")
            logger.warning("%s: the step after it is above the divergence bound; moved to %s", ckpt, aside.name)
        elif self.keep_checkpoints:
            run_dir.rotate(ckpt.parent, self.keep_checkpoints)

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
        ckpt = run_dir.checkpoint_dir(out, self.state.global_step)
        if self.guard is not None and self.guard.suspect:
            logger.warning(
                "not writing %s yet: the loss %.4g (smoothed %.4g) is above its bound %.4g (divergence guard)",
                ckpt.name,
                self.guard.last_loss,
                self.guard.ema,
                self.guard.bound(),
            )
            self.save_deferred = True
            return
        self.save_deferred = False
        w = distributed.world()
        need = self.checkpoint_bytes(out)
        (window,) = distributed.all_reduce_sum([float(self._tr_loss)], w, self.args.device)
        self.run_state.window = {"loss_sum": window / w.size, "since": self._globalstep_last_logged}
        with disk_full_as_one_line(f"checkpoint {ckpt.name}", ckpt, need):
            try:
                super()._save_checkpoint(model, trial)
                distributed.barrier(w)  # every rank's files (its RNG state) are in before the seal
                if w.is_main:
                    run_dir.seal(ckpt)
            except BaseException:
                if w.is_main:  # nothing that looks like a checkpoint is left, and the free space is measured without it
                    shutil.rmtree(ckpt, ignore_errors=True)
                raise
        if self.guard is not None:
            self.unverified = ckpt  # judged by the next step's loss (verify_checkpoint)
        elif w.is_main and self.keep_checkpoints:
            run_dir.rotate(out, self.keep_checkpoints)

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


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def checkpointing_args(on: bool) -> dict[str, Any]:
    """Non-reentrant activation checkpointing, under the name this transformers has (5.x renamed
    ``gradient_checkpointing`` to ``activation_checkpointing``; the old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: on, f"{key}_kwargs": {"use_reentrant": False}}


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
        **checkpointing_args(t.gradient_checkpointing),
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
        callbacks=[MetricsCallback(t.output_dir, extra_metrics)],
    )
