"""Typed run configuration: one dataclass per concern, YAML in and out, ``key=value`` overrides.

Validation raises ``ConfigError`` (a ``ValueError``) naming the dotted field and the bad value.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .choices import (
    DATA_FORMATS,
    DISTRIBUTED_MODES,
    DTYPE_NAMES,
    INIT_SOURCES,
    INITS,
    METHODS,
    QUANT_TYPES,
    REPORT_TO,
    TRAIN_OPTIMIZERS,
)
from .inits import InitSpec

CONFIG_VERSION = 1


def _f(default: Any, help: str) -> Any:
    """A config field with its one-line help (shown by ``qolora train --print-config``)."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A bad config key or value; the message names the field."""


@dataclass
class QuantConfig:
    type: Literal[QUANT_TYPES] = _f(
        "nf4", "4-bit quantization of the base: nf4 (QLoRA's), fp4, or none (unquantized base)"
    )
    double_quant: bool = _f(True, "quantize the 4-bit blocks' absmax statistics too (QLoRA's double quantization)")
    compute_dtype: str = _f(
        "auto",
        "dtype of 4-bit matmuls: auto (bf16 on CUDA, fp16 on older CUDA, fp32 on CPU), float32, bfloat16, float16",
    )

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("auto", *DTYPE_NAMES):
            raise ConfigError(
                f"quant.compute_dtype: expected auto, float32, bfloat16 or float16, got {self.compute_dtype!r}"
            )


@dataclass
class AdapterConfig:
    init: Literal[INITS] = _f(
        "olora",
        "adapter init: olora (QR of the original weight), pissa (its top-r SVD: QPiSSA), loftq (quantize, then "
        "refit B·A to what quantization lost) or lora (PEFT's default: B = 0); docs/inits.md",
    )
    init_iters: int = _f(
        1,
        "olora and loftq: quantization rounds T; between rounds the factors are refit to what quantizing the "
        "residual lost (olora keeps B orthonormal; 1 = plain OLoRA). Needs a 4-bit base above 1",
    )
    svd_niter: int | None = _f(
        None, "pissa only: randomized SVD (torch.svd_lowrank) with this many power iterations; null = exact SVD"
    )
    r: int = _f(16, "adapter rank")
    alpha: float = _f(16.0, "LoRA alpha; the adapter's scale is alpha / r")
    dropout: float = _f(0.0, "dropout on the adapter's input, in [0, 1)")
    target_modules: str | list[str] = _f("all-linear", "all-linear, or a list of module names to adapt")
    init_source: Literal[INIT_SOURCES] = _f(
        "auto",
        "source of OLoRA's W: auto (the original checkpoint, else the dequantized copy), checkpoint, dequantized",
    )
    olora_balance: bool = _f(
        False, "olora only: rescale B and A per component to equal norms (same product and base; see BENCHMARKS.md)"
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"adapter.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"adapter.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout: must be in [0, 1), got {self.dropout}")
        try:
            InitSpec(self.init, self.init_iters, self.svd_niter)
        except ValueError as e:
            raise ConfigError(f"adapter.{e}") from e


@dataclass
class DataConfig:
    train: str | list[str | dict] = _f(
        "",
        "training data: a jsonl, json, csv, parquet or arrow file, a saved dataset dir or a cached hub id (required); "
        "or a list of them, each optionally {path, max_rows, fraction}",
    )
    eval: str | None = _f(None, "held-out data in the same formats; default: data.eval_fraction of the training rows")
    format: Literal[("auto", *DATA_FORMATS)] = _f(
        "auto", f"row format: auto (detected), {', '.join(DATA_FORMATS)} (training/formats.py)"
    )
    template: Literal["auto", "chat", "plain"] = _f(
        "auto", "prompt rendering: auto (the tokenizer's chat template if it has one), chat, plain"
    )
    max_length: int = _f(512, "tokens per example; longer examples are truncated and counted")
    packing: bool = _f(
        False, "padding-free packing: whole examples into max_length packs, attention kept inside each example"
    )
    group_by_length: bool = _f(
        False, "unpacked batches of similar length (less padding); transformers' LengthGroupedSampler"
    )
    completion_only: bool = _f(True, "take the loss on completions (assistant turns) only, not on prompts")
    skip_bad_rows: bool = _f(False, "count and skip invalid rows instead of stopping at the first one")
    eval_fraction: float = _f(0.05, "share of training rows held out when data.eval is not set, in (0, 1)")
    max_train_rows: int | None = _f(None, "use at most this many training rows")
    max_eval_rows: int | None = _f(None, "use at most this many eval rows")

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("data.train: required (a json, jsonl, csv or parquet file, or a saved dataset dir)")
        for i, src in enumerate(self.train if isinstance(self.train, list) else []):
            check_source(src, f"data.train[{i}]")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length: must be >= 8, got {self.max_length}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        if self.packing and self.group_by_length:
            raise ConfigError("data.group_by_length: packs have no padding to save; use it without data.packing")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/qolora", "run folder: checkpoints, adapter/, metrics.json, loss.png, config.yaml")
    method: Literal[METHODS] = _f(
        "sft",
        "sft (supervised), preference tuning on TRL's trainers: dpo, ipo, orpo, kto, simpo (settings under "
        "pref; docs/preference.md), or online RL: grpo (settings under grpo, rewards in train.rewards)",
    )
    rewards: list[str] = field(
        default_factory=list,
        metadata={
            "help": "grpo: reward functions, module:function (importable from the config's folder or the Python "
            "path, TRL's signature f(prompts, completions, **columns)) or built-ins exact_match, format:<regex>, "
            "length:<words>"
        },
    )
    max_steps: int = _f(-1, "optimizer steps; -1 trains for train.epochs")
    epochs: float = _f(1.0, "passes over the data when max_steps is -1")
    batch_size: int = _f(4, "examples per device batch")
    grad_accum: int = _f(1, "batches accumulated per optimizer step")
    lr: float | Literal["auto"] = _f(
        "auto", "peak learning rate, or auto: the measured best for the adapter init and rank (training/lr.py)"
    )
    warmup_ratio: float = _f(0.03, "share of steps spent warming the lr up (then cosine decay)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    optimizer: Literal[TRAIN_OPTIMIZERS] = _f(
        "auto", "auto (paged AdamW 8-bit on CUDA, torch AdamW on CPU), paged_adamw_8bit, paged_adamw_32bit, adamw_torch"
    )
    gradient_checkpointing: bool = _f(
        True, "recompute activations in backward (non-reentrant): less memory, ~25% more time"
    )
    chunked_ce: bool = _f(True, "compute the LM-head loss in chunks, never the full [tokens, vocab] logits")
    ce_chunk: int = _f(1024, "rows per chunked-CE chunk")
    offload_activations: bool = _f(False, "keep saved activations in CPU memory during the forward pass")
    seed: int = _f(0, "seed of init, dropout and data order")
    save_steps: int = _f(100, "checkpoint every N steps (a --resume continues from the latest)")
    save_total_limit: int = _f(2, "complete checkpoints kept (the oldest are deleted)")
    eval_steps: int = _f(100, "token-weighted held-out loss every N steps (and at step 0)")
    logging_steps: int = _f(10, "log the training loss every N steps")
    report_to: Literal[REPORT_TO] = _f(
        "none",
        "log to: none, tensorboard (events in output_dir/runs/), wandb, mlflow (each: pip install 'qolora[NAME]')",
    )
    kernel_check: bool = _f(True, "check a 4-bit layer against its fp32 twin on this device before step 1")
    divergence_check: bool = _f(
        True,
        "stop at the first non-finite loss or gradient norm, or when the loss or its EMA over ~10 steps stays for "
        "divergence_patience steps above divergence_factor x its lowest level (a ~50-step mean, from step 10) "
        "or above 90% of a uniform guess's loss ln(vocab); no checkpoint is written while it is above",
    )
    divergence_factor: float = _f(3.0, "divergence guard: how many times its lowest level the smoothed loss may be")
    divergence_patience: int = _f(10, "divergence guard: steps in a row above that bound before the run stops")
    distributed: Literal[DISTRIBUTED_MODES] = _f(
        "auto",
        "under torchrun / accelerate launch: auto (ddp whenever there is more than one process), ddp (a full "
        "4-bit model per rank, gradients all-reduced), fsdp (FSDP-QLoRA through FSDP2: each rank holds 1/N of "
        "the 4-bit base and the adapter, for a model no one GPU holds; rank 0 alone reads it, onto its CPU, "
        "and sends it one layer at a time)",
    )

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "grad_accum",
            "save_steps",
            "eval_steps",
            "logging_steps",
            "save_total_limit",
            "ce_chunk",
            "divergence_patience",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr != "auto" and self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"train.max_steps: must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs: must be > 0, got {self.epochs}")
        if not self.divergence_factor > 1:
            raise ConfigError(f"train.divergence_factor: must be > 1, got {self.divergence_factor}")


@dataclass
class PrefConfig:
    """Preference tuning's settings, named as TRL names them (train.method other than sft)."""

    beta: float | None = _f(
        None,
        "how far the policy may move from the reference (TRL's beta; ORPO's lambda, SimPO's beta); null: the "
        "method's default (0.1; simpo 2.0)",
    )
    loss_type: str | None = _f(
        None, "dpo only: TRL's DPO loss_type (sigmoid, hinge, robust, exo_pair, ...); null: sigmoid. ipo sets ipo"
    )
    label_smoothing: float = _f(0.0, "dpo: the share of pairs taken to be mislabeled (robust / cDPO), in [0, 0.5)")
    simpo_gamma: float = _f(0.5, "simpo: the target reward margin gamma")
    desirable_weight: float = _f(1.0, "kto: weight of the desirable (label true) examples' loss")
    undesirable_weight: float = _f(1.0, "kto: weight of the undesirable (label false) examples' loss")
    precompute_ref_log_probs: bool = _f(
        False,
        "dpo, ipo, kto: compute the reference's log-probs once before step 1 instead of at every step (the "
        "reference is the initial adapter either way)",
    )

    def __post_init__(self) -> None:
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"pref.beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"pref.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        for k in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"pref.{k}: must be > 0, got {getattr(self, k)}")


@dataclass
class GRPOSettings:
    """GRPO's settings, named as TRL names them (train.method: grpo)."""

    num_generations: int = _f(4, "completions sampled per prompt (the group its rewards are normalized over)")
    max_completion_length: int = _f(32, "tokens per sampled completion")
    temperature: float = _f(1.0, "sampling temperature of the completions")
    beta: float = _f(0.0, "KL weight against the reference (the initial model, exactly); 0: no reference")
    loss_type: str = _f("dapo", "TRL's GRPO loss_type (grpo, dapo, dr_grpo, bnpo, ...)")
    scale_rewards: str = _f("group", "divide advantages by the reward std over the group, the batch, or none")

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations: must be >= 2 (a group), got {self.num_generations}")
        if self.max_completion_length < 1:
            raise ConfigError(f"grpo.max_completion_length: must be >= 1, got {self.max_completion_length}")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature: must be > 0, got {self.temperature}")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta: must be >= 0, got {self.beta}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"grpo.scale_rewards: expected group, batch or none, got {self.scale_rewards!r}")


@dataclass
class Config:
    model: str = _f("", "a local HF model folder, or a hub id in the local cache (required)")
    quant: QuantConfig = field(default_factory=QuantConfig, metadata={"help": "how the base is quantized"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"help": "the adapter"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training and held-out data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the training run"})
    pref: PrefConfig = field(
        default_factory=PrefConfig, metadata={"help": "preference tuning (train.method dpo, ipo, orpo, kto, simpo)"}
    )
    grpo: GRPOSettings = field(default_factory=GRPOSettings, metadata={"help": "online RL (train.method: grpo)"})
    version: int = _f(CONFIG_VERSION, "config format version")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: required (a local HF model folder or a cached hub id)")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"version: this QOLoRA reads config version {CONFIG_VERSION}, got {self.version}")
        a = self.adapter
        if self.quant.type == "none" and (a.init == "loftq" or a.init_iters > 1):
            raise ConfigError(
                f"adapter.init: {a.init} with {a.init_iters} round(s) refits to what 4-bit quantization loses; "
                "quant.type is none (set quant.type: nf4, or use olora / pissa with init_iters 1)"
            )
        if self.train.method != "sft" and self.train.distributed == "fsdp":
            raise ConfigError(
                f"train.distributed: fsdp runs sft only for now; train.method={self.train.method} runs on one "
                "process or under ddp"
            )
        t = self.train
        if t.method == "grpo" and not t.rewards:
            raise ConfigError(
                "train.rewards: grpo needs at least one reward (module:function, or exact_match, "
                "format:<regex>, length:<words>)"
            )
        if self.pref.loss_type is not None and self.train.method != "dpo":
            raise ConfigError(
                f"pref.loss_type: sets DPO's loss; train.method is {self.train.method} (ipo, simpo and kto fix "
                "their own)"
            )


SOURCE_KEYS = ("path", "max_rows", "fraction")


def check_source(src: Any, where: str) -> None:
    """One entry of a data.train list: a path, or {path, max_rows (>= 1), fraction (in (0, 1])}."""
    if isinstance(src, str):
        if not src:
            raise ConfigError(f"{where}: empty path")
        return
    if not isinstance(src, dict):
        raise ConfigError(f"{where}: expected a path or a mapping with {list(SOURCE_KEYS)}, got {src!r}")
    unknown = sorted(set(src) - set(SOURCE_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(SOURCE_KEYS)})")
    if not isinstance(src.get("path"), str) or not src["path"]:
        raise ConfigError(f"{where}.path: required, a data file, dataset dir or cached hub id")
    n = src.get("max_rows")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{where}.max_rows: must be an integer >= 1, got {n!r}")
    f = src.get("fraction")
    if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
        raise ConfigError(f"{where}.fraction: must be in (0, 1], got {f!r}")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return "a list" if typing.get_origin(tp) is list else tp.__name__


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly coerce: int -> float) ``value`` against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_describe(a) for a in typing.get_args(tp))}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where + '.' if where else ''}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        kwargs[name] = _build(tp, value, key) if dataclasses.is_dataclass(tp) else _check_type(value, tp, key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b=value`` override to raw config data; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from e


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = dict(data)
    for o in overrides:
        apply_override(data, o)
    return _build(Config, data, "")


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate.

    Relative data and model paths are resolved against the YAML file's folder when they exist
    there.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    cfg = config_from_dict(data, overrides)
    base = p.resolve().parent
    cfg.source_dir = str(base)  # not a field: where train.rewards modules are also looked for
    for obj, name in ((cfg, "model"), (cfg.data, "train"), (cfg.data, "eval")):
        value = getattr(obj, name)
        if value and not Path(value).is_absolute() and (base / value).exists() and not Path(value).exists():
            setattr(obj, name, str(base / value))
    return cfg


# Sections that fix the model a run trains: a --resume must not change them.
FROZEN_ON_RESUME = ("model", "quant", "adapter")


def changed_on_resume(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Dotted keys of the model, quant and adapter sections that differ from a run's saved config."""
    now = to_dict(cfg)
    changed = []
    for section in FROZEN_ON_RESUME:
        old, new = saved.get(section), now[section]
        if isinstance(new, dict) and isinstance(old, dict):
            changed += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(section)
    return changed


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as {dotted key: value}."""
    return {
        f"{k}.{kk}" if isinstance(v, dict) else k: vv
        for k, v in to_dict(cfg).items()
        for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])
    }


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (atomically)."""
    from ._io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_help(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field, in declaration order."""
    cls = cls or Config
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            rows += field_help(f.default_factory, key + ".")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((key, default, f.metadata.get("help", "")))
    return rows


def key_table() -> str:
    """The config-key table of docs/configuration.md, generated from the fields' help."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help in field_help():
        shown = "(required)" if default == "" else f"`{default}`" if default is not None else "`null`"
        lines.append(f"| `{key}` | {shown} | {help} |")
    return "\n".join(lines)


def commented_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each key with its help as a comment (``--print-config``)."""
    helps = {key: help for key, _, help in field_help()}
    sections = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Config)}
    out = []
    for name, value in to_dict(cfg).items():
        if isinstance(value, dict):
            out.append(f"{name}:  # {sections[name]}")
            for k, v in value.items():
                line = "  " + yaml.safe_dump({k: v}, default_flow_style=True, width=10**6).strip()[1:-1]
                out.append(f"{line}  # {helps[f'{name}.{k}']}")
        else:
            line = yaml.safe_dump({name: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            out.append(f"{line}  # {helps[name]}")
    return "\n".join(out) + "\n"
