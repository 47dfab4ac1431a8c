"""Preference tuning (DPO, IPO, ORPO, KTO, SimPO) on TRL's own trainers and losses, on the run harness.

What QOLoRA adds to TRL is the reference. DPO, IPO and KTO compare the policy with a reference
that must be the model at step 0. Given a PEFT model, TRL copies its adapter into a frozen "ref"
adapter; that is the initial model for every init, provided the policy's adapter is still the
initial one when the trainer starts. TRL then casts a 4-bit model's trainable adapter to bf16,
which moves the policy away from the initial model (and from its reference) before step 1, and
off the factors the 4-bit residual was taken with (docs/design.md, invariant 2). ``exact_start_``
puts the adapter back, bit for bit, and checks that the reference holds the same factors.

With "adapters off" as the reference (TRL given a ``peft_config``, and most peers), a factored
init's reference would be the residual base W - s·B0·A0, not the initial model:
``tests/test_preference.py`` shows that control failing the step-0 check.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..choices import PREFERENCE_METHODS
from ..config import Config, ConfigError
from .callbacks import MetricsCallback
from .data import DataError, Rows, batch_rows
from .formats import FORMATS, PAIRED, plain_chat_segments
from .harness import RunHarness, common_args, make_guard
from .sampling import SeededGeneration

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of the initial adapter
WITH_REFERENCE = ("dpo", "ipo", "kto")  # methods whose loss compares with a reference model (grpo: beta > 0)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "kto": 0.1, "simpo": 2.0}  # SimPO's paper uses 2.0-2.5


TRL_FLOOR = "1.16"  # the TRL the reference handling was built and tested on (pyproject's trl extra)


def check_trl(method: str, loss_type: str | None = None) -> None:
    """One line before any model loads when ``method`` needs TRL and it is missing or too old, or
    when ``loss_type`` is not one of the DPO losses this TRL lists (TRL itself says so only at the
    first loss, after the model has loaded)."""
    if method == "sft":
        return
    import importlib.metadata
    import re

    from packaging.version import Version

    try:
        got = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"train.method={method} runs TRL's trainer: pip install 'qolora[trl]'") from None
    if Version(got) < Version(TRL_FLOOR):
        raise ConfigError(f"train.method={method}: needs trl>={TRL_FLOOR}, found {got}; pip install 'qolora[trl]'")
    if loss_type is not None:
        from trl import DPOConfig

        listed = re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata.get("help", ""))
        if listed and loss_type not in listed:
            raise ConfigError(
                f"pref.loss_type: {loss_type!r} is not one of TRL {got}'s DPO losses: {', '.join(listed)}"
            )


def formats_for(method: str) -> tuple[str, ...]:
    """The row formats a method trains on: pairs, and for KTO its own unpaired rows too (a pair
    gives KTO one desirable and one undesirable example)."""
    if method == "grpo":  # prompts: any row with a prompt (its reference answer is the row's reply)
        return tuple(f for f in FORMATS if f != "text")
    return (*PAIRED, "kto") if method == "kto" else PAIRED


def check_method_format(method: str, fmt: str, path: str) -> None:
    """One line before any model loads when the rows do not suit ``train.method``."""
    if method == "sft":
        if fmt == "kto":
            raise DataError(f"{path}: kto rows carry desirable / undesirable labels; train them with train.method=kto")
        if fmt in PAIRED:
            logger.info("%s: %s rows under sft: the prompt and its chosen reply are trained on", path, fmt)
        return
    if fmt not in formats_for(method):
        raise DataError(
            f"{path}: train.method={method} needs {' or '.join(formats_for(method))} rows "
            f"(prompt/chosen/rejected{', or prompt/completion/label' if method == 'kto' else ''}), got {fmt} rows"
        )


def _render(prompt: list[dict[str, str]], reply: str, chat: bool) -> tuple[Any, Any]:
    """(prompt, completion) in TRL's form: turns for the chat template (TRL renders them with it), or
    the plain template's text, split where the trained reply begins (as ``Encoder`` splits it)."""
    if chat:
        return prompt, [{"role": "assistant", "content": reply}]
    segs = plain_chat_segments([*prompt, {"role": "assistant", "content": reply}])
    first = next(i for i, (_, trained) in enumerate(segs) if trained)
    return "".join(t for t, _ in segs[:first]), "".join(t for t, _ in segs[first:])


def _trl_batch(batch: dict[str, list[Any]], fmt: str, method: str, chat: bool) -> dict[str, list[Any]]:
    rows = batch_rows(batch)
    if method == "grpo":  # the prompt, and the row's own reply as ``answer`` (for exact_match)
        out: dict[str, list[Any]] = {"prompt": [], "answer": []}
        for r in rows:
            turns = FORMATS[fmt].to_messages(r)
            last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
            out["prompt"].append(_render(turns[:last], turns[last]["content"], chat)[0])
            out["answer"].append(turns[last]["content"])
        return out
    if method == "kto":
        out: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
        for r in rows:
            replies = [(r["completion"], r["label"])] if fmt == "kto" else [(r["chosen"], True), (r["rejected"], False)]
            for reply, label in replies:
                p, c = _render(r["prompt"], reply, chat)
                out["prompt"].append(p)
                out["completion"].append(c)
                out["label"].append(label)
        return out
    out = {"prompt": [], "chosen": [], "rejected": []}
    for r in rows:
        p, c = _render(r["prompt"], r["chosen"], chat)
        out["prompt"].append(p)
        out["chosen"].append(c)
        out["rejected"].append(_render(r["prompt"], r["rejected"], chat)[1])
    return out


def trl_dataset(rows: Rows, method: str, chat: bool) -> Any:
    """Validated rows (``training/formats.py``) as the dataset TRL's trainer for ``method`` reads."""
    ds = rows.rows
    return ds.map(
        _trl_batch,
        batched=True,
        fn_kwargs={"fmt": rows.format, "method": method, "chat": chat},
        remove_columns=ds.column_names,
        desc=f"{method} rows",
    )


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def exact_start_(model: nn.Module, start: dict[str, torch.Tensor]) -> None:
    """Put the trainable adapter back to ``start`` (its values and dtypes before TRL's trainer was
    built), in place, and check that the reference adapter, if any, holds exactly those weights.

    Raises:
        RuntimeError: the reference is not the initial adapter (names the first parameter).
    """
    params = dict(model.named_parameters())
    for name, value in start.items():
        p = params[name]
        if p.dtype != value.dtype or not torch.equal(p.data, value):
            p.data = value.clone()
        ref = params.get(name.replace(".default.", f".{REFERENCE_ADAPTER}."))
        if ref is not None and (ref.dtype != value.dtype or not torch.equal(ref.data, value)):
            raise RuntimeError(f"{name}: the reference adapter is not the initial adapter")


def _method_args(cfg: Config) -> tuple[Any, type, dict[str, Any]]:
    """TRL's trainer class, its config class, and the method's settings under TRL's names."""
    m, p = cfg.train.method, cfg.pref
    beta = p.beta if p.beta is not None else DEFAULT_BETA.get(m)
    if m in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        loss = "ipo" if m == "ipo" else (p.loss_type or "sigmoid")
        return (
            DPOTrainer,
            DPOConfig,
            dict(
                beta=beta,
                loss_type=[loss],
                label_smoothing=p.label_smoothing,
                precompute_ref_log_probs=p.precompute_ref_log_probs,
            ),
        )
    if m == "kto":
        from trl import KTOConfig, KTOTrainer

        return (
            KTOTrainer,
            KTOConfig,
            dict(
                beta=beta,
                desirable_weight=p.desirable_weight,
                undesirable_weight=p.undesirable_weight,
                precompute_ref_log_probs=p.precompute_ref_log_probs,
            ),
        )
    if m == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, dict(beta=beta)
    if m == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        g = cfg.grpo
        return GRPOTrainer, GRPOConfig, {f: getattr(g, f) for f in g.__dataclass_fields__}
    if m == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer, CPOConfig, dict(beta=beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=p.simpo_gamma)
    raise ConfigError(f"train.method: {m} is not a preference method ({', '.join(PREFERENCE_METHODS)})")


def check_grpo_batch(cfg: Config, world_size: int) -> None:
    """GRPO samples ``num_generations`` completions per prompt into each global batch: refuse a
    global batch (batch_size x grad_accum x ranks) that is not a multiple, in one line."""
    t, n = cfg.train, cfg.grpo.num_generations
    total = t.batch_size * t.grad_accum * world_size
    if cfg.train.method == "grpo" and total % n:
        raise ConfigError(
            f"train.batch_size: grpo samples grpo.num_generations={n} completions per prompt, and the global batch "
            f"batch_size x grad_accum x ranks = {t.batch_size} x {t.grad_accum} x {world_size} = {total} is not "
            "a multiple"
        )


def training_record(cfg: Config) -> dict[str, Any]:
    """What ``qolora.json`` records of how an adapter was trained (``training``)."""
    if cfg.train.method == "sft":
        return {"method": "sft"}
    trainer_cls, _, settings = _method_args(cfg)
    return {"method": cfg.train.method, "trainer": f"trl.{trainer_cls.__name__}", **settings}


_HARNESSED: dict[tuple[type, ...], type] = {}


def harnessed(trainer_cls: type, *mixins: type) -> type:
    """``trainer_cls`` with the run harness (``RunHarness``) and ``mixins`` in front of it, made once
    per combination."""
    at = (trainer_cls, *mixins)
    if at not in _HARNESSED:
        _HARNESSED[at] = type(f"Qolora{trainer_cls.__name__}", (RunHarness, *mixins, trainer_cls), {})
    return _HARNESSED[at]


def build_preference_trainer(
    model: nn.Module,
    tokenizer: Any,
    train_rows: Any,
    eval_rows: Any | None,
    cfg: Config,
    extra_metrics: dict[str, Any] | None = None,
    eval_on_start: bool = True,
    rewards: list[Any] | None = None,
) -> Any:
    """TRL's trainer for ``cfg.train.method`` on a QOLoRA PeftModel, on the run harness, starting
    exactly at the initial model (``exact_start_``); call ``.train()`` on it.

    ``train_rows`` / ``eval_rows``: ``trl_dataset`` outputs. ``rewards``: grpo's reward functions
    (``rewards.resolve_all``).
    """
    t = cfg.train
    trainer_cls, config_cls, settings = _method_args(cfg)
    common, extra_metrics = common_args(model, cfg, eval_rows is not None, eval_on_start, extra_metrics)
    fields = set(config_cls.__dataclass_fields__)
    if "gradient_checkpointing" in fields:  # TRL's own field (default on) beside transformers' new name
        common["gradient_checkpointing"] = t.gradient_checkpointing
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if "max_length" in fields:
        common["max_length"] = cfg.data.max_length
    if t.method == "grpo":  # an eval batch of whole groups, the same global size at any world size
        common["per_device_eval_batch_size"] = t.batch_size * t.grad_accum
    args = config_cls(**common, **settings)
    guard = make_guard(t, from_start=True, finite_only=t.method == "grpo")
    extra_metrics["divergence_guard"] = guard.settings() if guard else None
    start = _trainable(model)
    more = {"reward_funcs": rewards} if t.method == "grpo" else {}
    mixins = (SeededGeneration,) if t.method == "grpo" else ()  # completions: a function of seed, step, index
    trainer = harnessed(trainer_cls, *mixins)(
        **more,
        guard=guard,
        keep_checkpoints=t.save_total_limit,
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(t.output_dir, extra_metrics)],
    )
    exact_start_(model, start)
    if t.method in WITH_REFERENCE or t.method == "grpo" and cfg.grpo.beta > 0:
        if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
            raise RuntimeError(f"{trainer_cls.__name__} built no reference adapter: its reference would not be exact")
        extra_metrics["reference"] = "the initial adapter, frozen (one 4-bit base, two adapters)"
    return trainer


def drop_reference_(model: nn.Module) -> None:
    """Delete TRL's reference adapter, in place, before the trained adapter is saved."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
