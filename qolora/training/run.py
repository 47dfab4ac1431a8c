"""``train(cfg)``: the whole pipeline on one screen.

load_quantized → get_qolora_model → build_trainer → train → save_adapter

Around it: the ranks join and agree on the config (``distributed``), the run folder is locked and
its latest complete checkpoint found (``run_dir``), rows are tokenized before any model loads, the
OLoRA init runs once (``init_once``) and the kernel is checked; a divergence or a signal ends the
run in one line with its checkpoints intact (``guard``), and only a finished run writes ``adapter/``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .. import distributed, fsdp, quant
from .._io import RunStopped
from ..adapter_dir import DATA_KEYS
from ..adapters import QoloraState, check_ranks, get_qolora_model, load_adapter, meta_peft_model, save_adapter
from ..config import Config, ConfigError, dump_config, flat_dict
from ..files import FINAL_ADAPTER, INITIAL_ADAPTER, META_FILE, RUN_CONFIG_FILE
from ..inits import InitSpec
from ..quant import check_kernel, meta_model, resolve_model
from ..quant.experts import has_unfused_experts, unfuse_
from . import run_dir
from .callbacks import MetricsCallback
from .data import load_rows, load_sources
from .guard import DivergedError, SignalStop
from .harness import check_report_to
from .preference import (
    build_preference_trainer,
    check_grpo_batch,
    check_method_format,
    check_trl,
    drop_reference_,
    training_record,
    trl_dataset,
)
from .rewards import resolve_all as resolve_rewards
from .tokenize import Encoder, head, pack_examples, split_rows
from .trainer import build_trainer, prepare_for_training_

logger = logging.getLogger(__name__)


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prepare_data(cfg: Config, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Validate and tokenize every row before any model is loaded. A preference method's rows are
    validated here and tokenized by TRL's trainer (``preference.trl_dataset``)."""
    d, method = cfg.data, cfg.train.method
    rows = head(load_sources(d.train, d.format, d.skip_bad_rows, cfg.train.seed), d.max_train_rows)
    if d.eval:
        eval_rows = load_rows(d.eval, d.format, d.skip_bad_rows)
    else:
        rows, eval_rows = split_rows(rows, d.eval_fraction, cfg.train.seed)
    eval_rows = head(eval_rows, d.max_eval_rows)
    for r in (rows, eval_rows):
        check_method_format(method, r.format, r.path)
    if method != "sft":
        chat = Encoder(tokenizer, d.max_length, d.template).template == "chat"
        train_ds, eval_ds = trl_dataset(rows, method, chat), trl_dataset(eval_rows, method, chat)
        stats = {
            "format": rows.format,
            "template": "chat" if chat else "plain",
            "train": {"rows": len(rows.rows), "examples": len(train_ds)},
            "eval": {"rows": len(eval_rows.rows), "examples": len(eval_ds)},
            "skipped_rows": len(rows.skipped),
        }
        return train_ds, (eval_ds if len(eval_ds) else None), stats
    enc_train = Encoder(tokenizer, d.max_length, d.template, d.completion_only)
    enc_eval = Encoder(tokenizer, d.max_length, d.template, d.completion_only)
    train_ex, eval_ex = enc_train.encode_rows(rows), enc_eval.encode_rows(eval_rows)
    if d.packing:
        train_ex = pack_examples(train_ex, d.max_length)
    stats = {
        "format": rows.format,
        "train": vars(enc_train.stats),
        "eval": vars(enc_eval.stats),
        "skipped_rows": len(rows.skipped),
    }
    return train_ex, eval_ex, stats


def load_base(cfg: Config, device_map: Any = None, quant_storage: str | None = None) -> nn.Module:
    q = cfg.quant
    return quant.load_base(
        cfg.model,
        quant_type=q.type,
        compute_dtype=q.compute_dtype,
        double_quant=q.double_quant,
        device_map=device_map,
        quant_storage=quant_storage,
    )


def lora_config(cfg: Config) -> Any:
    from peft import LoraConfig

    a = cfg.adapter
    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=a.target_modules,
        # PEFT's LoraConfig refuses "loftq" without scipy and a loftq_config: init_once names the init itself
        init_lora_weights=True if a.init == "loftq" else InitSpec(a.init, a.init_iters, a.svd_niter).peft_name,
        task_type="CAUSAL_LM",
    )


def initial_model(
    cfg: Config, base: nn.Module, out: Path, fresh: bool, data: dict[str, Any], progress: bool = True
) -> Any:
    """``fresh``: the init, written to ``initial_adapter/``; else that exact model rebuilt from it (no QR)."""
    if fresh:
        a = cfg.adapter
        model = get_qolora_model(
            base,
            lora_config(cfg),
            init_source=a.init_source,
            balance=a.olora_balance,
            init=a.init,
            init_iters=a.init_iters,
            svd_niter=a.svd_niter,
        )
    else:
        model = load_adapter(out / INITIAL_ADAPTER, base, is_trainable=True, progress=progress)
    model.qolora_states["default"].meta.data = data  # in qolora.json: eval, export and generate read it there
    if fresh:
        save_adapter(model, out / INITIAL_ADAPTER)
    return model


def data_meta(cfg: Config, data_format: str) -> dict[str, Any]:
    """The data settings an adapter records (the format as detected, not "auto")."""
    return {**{k: getattr(cfg.data, k) for k in DATA_KEYS}, "format": data_format}


def init_once(
    cfg: Config, base: nn.Module, out: Path, fresh: bool, w: distributed.World, data_format: str
) -> tuple[nn.Module, list]:
    """The OLoRA init runs once, on rank 0, and is written to ``initial_adapter/``; every other rank
    (and a resume) rebuilds that exact base from it without a QR. Per-rank digests then prove that
    every rank holds the same base and factors (docs/design.md, "one init, every rank")."""
    data = data_meta(cfg, data_format)
    if w.is_main:
        model = initial_model(cfg, base, out, fresh, data)
    distributed.barrier(w)
    if not w.is_main:
        model = initial_model(cfg, base, out, False, data, progress=False)
    digests = distributed.verify_same_model(model, w, model.qolora_states["default"].factors)
    return model, digests


def init_sharded(
    cfg: Config, out: Path, fresh: bool, w: distributed.World, data_format: str
) -> tuple[Any, fsdp.Sharded, float]:
    """FSDP: rank 0 loads the 4-bit base on the CPU and runs the one init (or rebuilds it from
    ``initial_adapter/``); every other rank builds the same model on meta and reads no weight;
    then each layer goes from rank 0 to every rank's device and is sharded at once (``qolora.fsdp``),
    so a base larger than one GPU starts. Returns the model, what the sharding did, and rank 0's load time."""
    gc = cfg.train.gradient_checkpointing
    t0 = time.perf_counter()
    if w.is_main:
        base = load_base(cfg, {"": "cpu"}, distributed.quant_storage("fsdp"))
        load_s = time.perf_counter() - t0
        spec = quant.twin_spec(base)  # before PEFT wraps the 4-bit layers: names as in the config's model
        unfused = has_unfused_experts(base)  # MoE experts loaded one 4-bit layer per matrix: the twin does too
        prepare_for_training_(base, gc)
        model = initial_model(cfg, base, out, fresh, data_meta(cfg, data_format))
        state = model.qolora_states["default"]
        state = QoloraState(state.meta, report=state.report)  # the factors stay with rank 0, which saves
    spec, state, load_s, unfused = distributed.broadcast_object(
        (spec, state, load_s, unfused) if w.is_main else None, w
    )
    if not w.is_main:
        base = meta_model(cfg.model)
        if unfused:
            unfuse_(base)
        quant.make_4bit_twin_(base, spec)
        prepare_for_training_(base, gc)
        model = meta_peft_model(base, lora_config(cfg))
        model.qolora_states = {"default": state}
    return model, fsdp.load_sharded_(model, w, cfg.train.kernel_check), load_s


@contextlib.contextmanager
def locked(out: Path, w: distributed.World) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the body (``run_dir.run_lock``); every rank learns if it could not."""
    with contextlib.ExitStack() as stack:
        err = None
        if w.is_main:
            try:
                stack.enter_context(run_dir.run_lock(out))
            except run_dir.RunLockedError as e:
                err = str(e)
        err = distributed.all_gather(err, w)[0]
        if err:
            raise run_dir.RunLockedError(err)
        yield


@contextlib.contextmanager
def signals_stop(w: distributed.World, out: Path) -> Iterator[SignalStop | None]:
    """SIGTERM / SIGINT checkpoint the step in progress, then stop (``SignalStop``); with several
    ranks they agree on the step. Off the main thread (no signal handlers there) several ranks exit
    at once in one line."""
    if threading.current_thread() is not threading.main_thread():
        distributed.exit_in_one_line_on_sigterm(w, out)
        yield None
        return
    stop = SignalStop(world=w, output_dir=str(out))
    stop.install()
    try:
        yield stop
    finally:
        stop.uninstall()


def resume_point(out: Path, resume: bool, w: distributed.World) -> Path | None:
    """The checkpoint a --resume continues (the newest complete one, found by rank 0, which sets the
    incomplete ones aside); without --resume, none may exist."""
    found = run_dir.checkpoints(out) if out.exists() else []
    if found and not resume:
        raise ConfigError(
            f"train.output_dir: {out} already has {found[-1][1].name}; pass --resume, or choose another dir"
        )
    ckpt = run_dir.latest_complete_checkpoint(out) if resume and found and w.is_main else None
    ckpt = distributed.all_gather(str(ckpt) if ckpt else None, w)[0]
    return Path(ckpt) if ckpt else None


def write_stop(trainer: Any, stopped: dict[str, Any], w: distributed.World) -> None:
    """Record why the run stopped in ``metrics.json`` (rank 0)."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, MetricsCallback) and w.is_main:
            cb.extra["stopped"] = stopped
            cb.write(trainer.state)


def run_trainer(trainer: Any, ckpt: Path | None, out: Path, stop: SignalStop | None, w: distributed.World) -> None:
    """``trainer.train()``; a divergence or a signal is recorded in ``metrics.json`` and ends in one line."""
    if stop is not None:
        trainer.add_callback(stop)
    if ckpt is not None:  # the guard and the logging window continue as in the uninterrupted run
        trainer.run_state.load(run_dir.saved_callback_state(ckpt, "RunState"))
    try:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        if trainer.guard is not None and (stop is None or stop.report() is None):
            evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
            trainer.guard.judge_end(trainer.state.global_step, evals)  # a blow-up shorter than the patience
    except DivergedError as e:
        last = run_dir.latest_complete_checkpoint(out, set_aside=False)
        write_stop(trainer, {"reason": "diverged", "message": str(e), "last_checkpoint": last and last.name}, w)
        aside = run_dir.set_aside_names(out, "diverged")
        where = f"the last good checkpoint is {last}" if last else "no checkpoint from before the blow-up is left"
        where += f" ({', '.join(aside)} set aside: written after it began)" if aside else ""
        raise DivergedError(
            f"{e}; {where}, and no adapter/ was written; lower train.lr and train again in a new "
            "train.output_dir (a --resume would take the same steps), or set train.divergence_check=false"
        ) from None
    report = stop.report() if stop is not None else None
    if report is None and trainer.unverified is not None and w.is_main and trainer.keep_checkpoints:
        run_dir.rotate(out, trainer.keep_checkpoints)  # the run finished: its last checkpoint counts
    if report is not None:
        write_stop(trainer, report, w)
        stop.done()  # from here a launcher's SIGTERM (sent when the first rank exits) changes nothing
        distributed.barrier(w)  # no rank exits while another still writes its part of the stop
        saved = (
            f"wrote checkpoint-{report['step']} in {report['signal_to_saved_s']} s"
            if report["step"]
            else "wrote no checkpoint (the divergence guard held it back)"
        )
        raise RunStopped(
            f"stopped by {report['reason']}: {saved}; --resume continues from it in {out}", 128 + stop.signum
        )


def train(cfg: Config, resume: bool = False) -> Path:
    """Fine-tune per ``cfg``; returns the final adapter dir. ``resume`` continues the latest checkpoint.

    Under torchrun or accelerate launch every process runs this; rank logic is in ``distributed``.

    Raises:
        ConfigError, RunLockedError, DiskFullError, DivergedError: one line each (exit 2 from the CLI).
        RunStopped: SIGTERM or SIGINT, after the checkpoint of the step in progress was written.
    """
    w = distributed.world()
    mode = distributed.resolve_mode(cfg.train.distributed, w)
    distributed.setup(w)
    distributed.check_same("the config", {**flat_dict(cfg), "--resume": resume}, w)
    out = Path(cfg.train.output_dir)
    with distributed.lost_rank_as_one_line(w, out), locked(out, w), signals_stop(w, out) as stop:
        return _train(cfg, resume, mode, out, stop, w)


def _train(cfg: Config, resume: bool, mode: str, out: Path, stop: SignalStop | None, w: distributed.World) -> Path:
    ckpt = resume_point(out, resume, w)
    if resume:
        run_dir.check_resume(cfg, out)
        run_dir.check_world_size(out, w.size)
    check_report_to(cfg.train.report_to)
    check_trl(cfg.train.method, cfg.pref.loss_type)
    check_grpo_batch(cfg, w.size)
    resolve_model(cfg.model)
    check_ranks(meta_model(cfg.model), lora_config(cfg))  # before any weight is loaded or factor allocated
    tokenizer = load_tokenizer(cfg.model)
    with distributed.main_process_first(w):  # one process validates and tokenizes; the others read its cache
        train_ex, eval_ex, data_stats = prepare_data(cfg, tokenizer)
    rewards = (  # grpo: every reward imported and called on two real rows, before any model loads
        resolve_rewards(cfg.train.rewards, getattr(cfg, "source_dir", None), [train_ex[0], train_ex[1]])
        if cfg.train.method == "grpo"
        else None
    )
    distributed.barrier(w)  # every rank has checked the run dir before rank 0 writes into it
    if w.is_main:
        dump_config(cfg, out / RUN_CONFIG_FILE)
    fresh = not (resume and (out / INITIAL_ADAPTER / META_FILE).is_file())
    if mode == "fsdp":
        t0 = time.perf_counter()
        model, sharded, load_s = init_sharded(cfg, out, fresh, w, data_stats["format"])
        digests, kernel = sharded.digests, sharded.kernel
        t0 += load_s  # as below: from the loaded base on, here to the last layer sharded
    else:
        base = load_base(cfg, w.device_map)
        prepare_for_training_(base, cfg.train.gradient_checkpointing)
        t0 = time.perf_counter()
        model, digests = init_once(cfg, base, out, fresh, w, data_stats["format"])
        kernel = check_kernel(model) if cfg.train.kernel_check else None  # every rank checks its own device
    init_s = time.perf_counter() - t0  # rank 0's init and save, the others' rebuild or receipt, the digests
    if resume:
        logger.info("resuming from %s", ckpt if ckpt else "the start: no checkpoint was complete")
    report = model.qolora_states["default"].report
    t = cfg.train
    extra = {
        "data": data_stats,
        "init_report": report.to_dict() if report else None,
        "kernel_check": vars(kernel) if kernel else None,
        "world_size": w.size,
        "distributed": mode,
        "global_batch": t.batch_size * t.grad_accum * w.size,
        "init_digests": digests,
        "init_s": round(init_s, 3),
        "model_bytes": quant.held_bytes(model),  # what this rank holds (a shard under FSDP)
        "training": training_record(cfg),  # the method and its settings, as qolora.json records them
    }
    if mode == "fsdp":
        extra["fsdp_load"] = distributed.all_gather(sharded.memory, w)  # per rank: parameter bytes held
    logger.info(
        "global batch %d = batch_size %d x grad_accum %d x %d process(es)",
        extra["global_batch"],
        t.batch_size,
        t.grad_accum,
        w.size,
    )
    if t.method == "sft":
        trainer = build_trainer(model, tokenizer, train_ex, eval_ex, cfg, extra, eval_on_start=not resume)
    else:
        trainer = build_preference_trainer(
            model, tokenizer, train_ex, eval_ex, cfg, extra, eval_on_start=not resume, rewards=rewards
        )
    run_trainer(trainer, ckpt, out, stop, w)
    drop_reference_(model)
    model.qolora_states["default"].meta.training = extra["training"]
    final = out / FINAL_ADAPTER
    state = fsdp.full_trainable_state(model) if mode == "fsdp" else None  # gathered from every rank
    if w.is_main:
        save_adapter(model, final, state_dict=state)
    distributed.barrier(w)
    return final
