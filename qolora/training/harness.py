"""The run harness every method's trainer takes: sealed checkpoints, the divergence guard's hooks,
full-state FSDP saves. ``RunHarness`` is a mixin put before any ``transformers.Trainer`` subclass
(ours for SFT, TRL's for DPO, KTO, ORPO, SimPO), so each method is a trainer choice, not a copy of this.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import disk_full_as_one_line
from ..config import Config, ConfigError, TrainConfig
from ..quant.experts import has_unfused_experts
from . import run_dir
from .guard import DivergenceGuard, RunState
from .lr import resolve_lr

logger = logging.getLogger(__name__)


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


class RunHarness:
    """Mixin for a ``transformers.Trainer`` subclass (``class T(RunHarness, SomeTrainer)``).

    Its checkpoints are sealed once complete (``run_dir``), a full disk while writing one is one
    line, a ``DivergenceGuard`` (if given) checks each optimizer step before it is applied, and an
    FSDP2 model's adapter and optimizer state are saved whole (world-size independent).
    """

    def __init__(
        self, *args: Any, guard: DivergenceGuard | None = None, keep_checkpoints: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.guard, self.keep_checkpoints = guard, keep_checkpoints
        self._step_loss: torch.Tensor | None = None
        self.unverified: Path | None = None  # the newest checkpoint, until the next step's loss is seen
        self.save_deferred = False  # a save a suspect step held back
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


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


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


def checkpointing_args(on: bool) -> dict[str, Any]:
    """Non-reentrant activation checkpointing, under the name this transformers has (5.x renamed
    ``gradient_checkpointing`` to ``activation_checkpointing``; the old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: on, f"{key}_kwargs": {"use_reentrant": False}}


def common_args(
    model: nn.Module, cfg: Config, has_eval: bool, eval_on_start: bool, extra_metrics: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``TrainingArguments`` fields every method shares (TRL's configs subclass it), and
    ``extra_metrics`` with the resolved lr and why."""
    on_cuda = torch.cuda.is_available()
    t = cfg.train
    lr, why = resolve_lr(t.lr, cfg.adapter.init, cfg.adapter.r, cfg.adapter.alpha, t.method)
    logger.info("learning rate %g (%s)", lr, why)
    extra_metrics = {**(extra_metrics or {}), "lr": {"value": lr, "why": why}}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)
    args = dict(
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
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        eval_on_start=has_eval and eval_on_start,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        report_to=check_report_to(t.report_to),
        dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a non-finite loss is logged as it is, never averaged away
        disable_tqdm=False,
        # every LoRA weight gets a gradient, but a MoE expert no token of a rank's batch reached gets none
        ddp_find_unused_parameters=has_unfused_experts(model),
    )
    return args, extra_metrics


def make_guard(
    t: TrainConfig, uniform_loss: float | None = None, from_start: bool = False, finite_only: bool = False
) -> DivergenceGuard | None:
    """The divergence guard for a run (None when ``train.divergence_check`` is off).

    ``uniform_loss``: ln(vocab), for a next-token loss (SFT). ``from_start``: the bound never drops
    below ``factor`` x the first step's loss, for a loss that starts at a known level and may fall
    towards 0 (a preference loss starts at ln 2 for DPO; its lowest level says nothing of a blow-up).
    ``finite_only``: only a non-finite loss or gradient norm (GRPO's surrogate loss sits near 0).
    """
    if not t.divergence_check:
        return None
    return DivergenceGuard(
        t.divergence_factor, t.divergence_patience, uniform_loss, from_start=from_start, finite_only=finite_only
    )
