"""``train(cfg)``: the whole pipeline on one screen.

load_quantized → get_qolora_model → build_trainer → train → save_adapter
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from torch import nn

from .. import distributed, quant
from ..adapter_dir import DATA_KEYS, META_FILE
from ..adapters import check_ranks, get_qolora_model, load_adapter, save_adapter
from ..config import Config, ConfigError, changed_on_resume, dump_config, flat_dict
from ..quant import check_kernel, meta_model, resolve_model
from .data import load_rows, load_sources
from .tokenize import Encoder, head, pack_examples, split_rows
from .trainer import build_trainer, check_report_to, prepare_for_training_

logger = logging.getLogger(__name__)

INITIAL_ADAPTER = "initial_adapter"
FINAL_ADAPTER = "adapter"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The ``checkpoint-N`` dir with the largest N that holds a complete trainer state."""
    found = []
    for d in output_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / "trainer_state.json").is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def is_finished(run_dir: Path) -> bool:
    """The run wrote its final adapter (its qolora.json is written last, atomically)."""
    return (run_dir / FINAL_ADAPTER / META_FILE).is_file()


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prepare_data(cfg: Config, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """Validate and tokenize every row before any model is loaded."""
    d = cfg.data
    rows = head(load_sources(d.train, d.format, d.skip_bad_rows, cfg.train.seed), d.max_train_rows)
    if d.eval:
        eval_rows = load_rows(d.eval, d.format, d.skip_bad_rows)
    else:
        rows, eval_rows = split_rows(rows, d.eval_fraction, cfg.train.seed)
    eval_rows = head(eval_rows, d.max_eval_rows)
    enc_train = Encoder(tokenizer, d.max_length, d.template, d.completion_only)
    enc_eval = Encoder(tokenizer, d.max_length, d.template, d.completion_only)
    train_ex, eval_ex = enc_train.encode_rows(rows), enc_eval.encode_rows(eval_rows)
    if d.packing:
        train_ex = pack_examples(train_ex, d.max_length)
    stats = {"train": vars(enc_train.stats), "eval": vars(enc_eval.stats), "skipped_rows": len(rows.skipped)}
    return train_ex, eval_ex, stats


def load_base(cfg: Config, device_map: Any = None) -> nn.Module:
    q = cfg.quant
    return quant.load_base(
        cfg.model, quant_type=q.type, compute_dtype=q.compute_dtype, double_quant=q.double_quant, device_map=device_map
    )


def lora_config(cfg: Config) -> Any:
    from peft import LoraConfig

    a = cfg.adapter
    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=a.target_modules,
        init_lora_weights="olora" if a.init == "olora" else True,
        task_type="CAUSAL_LM",
    )


def check_resume(cfg: Config, out: Path) -> None:
    """Refuse a --resume whose model, quant or adapter settings differ from the run's own."""
    import yaml

    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved_path}: not valid YAML ({e})") from e
    changed = changed_on_resume(saved, cfg)
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} changed since the run in {out} started; restore them, "
            "or start a new run in another train.output_dir"
        )


def check_world_size(out: Path, w: distributed.World) -> None:
    """A --resume runs at the world size its checkpoints were written at (their data order and RNG)."""
    import json

    try:
        before = json.loads((out / "metrics.json").read_text()).get("world_size", 1)
    except (OSError, ValueError):
        return
    if before != w.size:
        raise ConfigError(
            f"--resume: the run in {out} ran on {before} process(es), this launch has {w.size}; relaunch with "
            f"{before} (torchrun --nproc_per_node / accelerate launch --num_processes), or start a new train.output_dir"
        )


def init_once(cfg: Config, base: nn.Module, out: Path, fresh: bool, w: distributed.World) -> tuple[nn.Module, list]:
    """The OLoRA init runs once, on rank 0, and is written to ``initial_adapter/``; every other rank
    (and a resume) rebuilds that exact base from it without a QR. Per-rank digests then prove that
    every rank holds the same base and factors (docs/design.md, "one init, every rank")."""
    initial = out / INITIAL_ADAPTER
    data = {k: getattr(cfg.data, k) for k in DATA_KEYS}  # in qolora.json: eval and export read it there
    if fresh and w.is_main:
        a = cfg.adapter
        model = get_qolora_model(base, lora_config(cfg), init_source=a.init_source, balance=a.olora_balance)
        model.qolora_states["default"].meta.data = data
        save_adapter(model, initial)
    distributed.barrier(w)
    if not (fresh and w.is_main):
        model = load_adapter(initial, base, is_trainable=True, progress=w.is_main)  # exact base, no QR
        model.qolora_states["default"].meta.data = data
    digests = distributed.verify_same_model(model, w, model.qolora_states["default"].factors)
    return model, digests


def train(cfg: Config, resume: bool = False) -> Path:
    """Fine-tune per ``cfg``; returns the final adapter dir. ``resume`` continues the latest checkpoint.

    Under torchrun or accelerate launch every process runs this; rank logic is in ``distributed``.
    """
    w = distributed.world()
    mode = distributed.resolve_mode(cfg.train.distributed, w)
    distributed.setup(w)
    distributed.check_same("the config", {**flat_dict(cfg), "--resume": resume}, w)
    out = Path(cfg.train.output_dir)
    distributed.exit_in_one_line_on_sigterm(w, out)
    ckpt = latest_checkpoint(out) if out.exists() else None
    if ckpt is not None and not resume:
        raise ConfigError(f"train.output_dir: {out} already has {ckpt.name}; pass --resume, or choose another dir")
    if resume:
        check_resume(cfg, out)
        check_world_size(out, w)
    check_report_to(cfg.train.report_to)
    resolve_model(cfg.model)
    check_ranks(meta_model(cfg.model), lora_config(cfg))  # before any weight is loaded or factor allocated
    tokenizer = load_tokenizer(cfg.model)
    with distributed.main_process_first(w):  # one process validates and tokenizes; the others read its cache
        train_ex, eval_ex, data_stats = prepare_data(cfg, tokenizer)
    distributed.barrier(w)  # every rank has checked the run dir before rank 0 writes into it
    if w.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    base = load_base(cfg, w.device_map)
    prepare_for_training_(base, cfg.train.gradient_checkpointing)
    t0 = time.perf_counter()
    model, digests = init_once(cfg, base, out, not (resume and (out / INITIAL_ADAPTER / META_FILE).is_file()), w)
    init_s = time.perf_counter() - t0  # on rank 0: its init and save, the others' rebuild, the digests
    if resume:
        logger.info("resuming from %s", ckpt if ckpt else "the start: no checkpoint was complete")
    kernel = check_kernel(model) if cfg.train.kernel_check else None  # on every rank: each checks its own device
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
    }
    logger.info(
        "global batch %d = batch_size %d x grad_accum %d x %d process(es)",
        extra["global_batch"],
        t.batch_size,
        t.grad_accum,
        w.size,
    )
    trainer = build_trainer(model, tokenizer, train_ex, eval_ex, cfg, extra, eval_on_start=not resume)
    trainer.train(resume_from_checkpoint=str(ckpt) if (resume and ckpt) else None)
    final = out / FINAL_ADAPTER
    if w.is_main:
        save_adapter(model, final)
    distributed.barrier(w)
    return final
