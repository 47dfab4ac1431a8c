"""Load a transformers causal LM with NF4 linear layers through bitsandbytes."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..precision import parse_dtype, resolve_compute_dtype
from .experts import fused_left, stores_experts_per_matrix, unfuse_, unfused_experts_loading
from .layout import keep_standard_layout_, skip_for_device
from .source import resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


# nn.Linear subclasses whose forward is exactly nn.Linear's (x @ Wᵀ + b). transformers 5 converts
# only modules whose type *is* nn.Linear, so these stayed in full precision; QOLoRA has them converted.
LINEAR_EQUIVALENT = ("FalconLinear",)


@contextlib.contextmanager
def linear_subclasses_as_linear() -> Iterator[None]:
    """While loading, ``LINEAR_EQUIVALENT`` modules are plain ``nn.Linear`` to transformers' bitsandbytes
    conversion, which then makes them ``Linear4bit`` like every other linear layer.

    Note:
        The conversion runs inside ``from_pretrained`` on the meta model, before any weight is read;
        this wraps the quantizer's hook for that step (``Bnb4BitHfQuantizer``) for the call only.
    """
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    original = Bnb4BitHfQuantizer._process_model_before_weight_loading

    def before_weight_loading(self: Any, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        for m in model.modules():
            if isinstance(m, nn.Linear) and type(m).__name__ in LINEAR_EQUIVALENT:
                m.__class__ = nn.Linear
        return original(self, model, *args, **kwargs)

    Bnb4BitHfQuantizer._process_model_before_weight_loading = before_weight_loading
    try:
        yield
    finally:
        Bnb4BitHfQuantizer._process_model_before_weight_loading = original


def is_linear(m: nn.Module) -> bool:
    """A linear layer of any kind: nn.Linear (subclasses and Linear4bit included) or GPT-2's Conv1D."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None)


def converted_to_4bit(m: nn.Module) -> bool:
    """Whether QOLoRA's 4-bit load converts this (unskipped) linear layer: exactly nn.Linear, a
    ``LINEAR_EQUIVALENT`` subclass, or Conv1D, as transformers' bitsandbytes conversion plus
    ``linear_subclasses_as_linear`` do."""
    return type(m) is nn.Linear or type(m).__name__ in (*LINEAR_EQUIVALENT, "Conv1D")


def kept_in_full_precision(model: nn.Module, name: str, skipped: set[str] = frozenset()) -> bool:
    """Whether module ``name`` is left out of the 4-bit conversion on purpose: named (in full or as a
    suffix, as transformers' skip list) in ``skipped`` or in the model's ``_keep_in_fp32_modules``."""
    keys = set(skipped) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keys)


def full_precision_linears(model: nn.Module, allowed: set[str]) -> list[tuple[str, int]]:
    """(name, extra bytes over 4-bit) of every linear layer (``is_linear``) of ``model`` that is not
    4-bit, leaving out the output embeddings and what ``kept_in_full_precision`` names."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, m in model.named_modules():
        if m is head or not is_linear(m) or kept_in_full_precision(model, name, allowed):
            continue
        w = m.weight
        if not hasattr(w, "quant_state"):
            found.append((name, int(w.numel() * (w.element_size() - 0.5))))
    return found


def held_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model actually holds, by kind: its 4-bit layers (packed data, quant_state statistics
    and codebooks, bias), its linear layers in full precision (LoRA factors and lm_head not counted),
    and every other parameter and buffer (embeddings, norms, lm_head, the adapters). Under FSDP each
    rank counts its local shards (a sharded 4-bit weight's statistics are not counted)."""
    from .nf4 import is_4bit, weight_parts

    def nbytes(tensors: Any) -> int:  # an FSDP shard (DTensor) counts its local part
        local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
        return sum(t.numel() * t.element_size() for t in local)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    four = linear = as_params = 0
    for name, m in model.named_modules():
        if m is head or ".lora_" in name or name.rsplit(".", 1)[-1].startswith("lora_"):
            continue
        own = list(m.parameters(recurse=False))
        if is_4bit(m):
            parts = weight_parts(m)[1] if hasattr(m.weight, "quant_state") else [("data", m.weight)]  # FSDP: a shard
            four += nbytes(t for _, t in parts) + nbytes(p for p in own if p is not m.weight)
            as_params += nbytes(own)
        elif is_linear(m):
            linear += nbytes(own)
            as_params += nbytes(own)
    total = nbytes(model.parameters()) + nbytes(model.buffers())
    return {"4bit_layers": int(four), "full_precision_linears": int(linear), "other": int(total - as_params)}


def bnb_config(
    compute_dtype: torch.dtype,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    skip_modules: list[str] | None = None,
) -> Any:
    """A ``transformers.BitsAndBytesConfig`` for 4-bit loading, every setting explicit."""
    from transformers import BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=skip_modules,
    )


def _device_type(device_map: Any) -> str:
    """Where a ``from_pretrained`` device_map puts the model: "cpu" or the accelerator's type."""
    if isinstance(device_map, dict) and device_map:
        places = {str(v) for v in device_map.values()}
        return "cpu" if places <= {"cpu", "disk"} else "cuda"
    if isinstance(device_map, (str, torch.device)) and str(device_map).startswith("cpu"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def meta_model(path: str | dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
    """The model of ``path``'s ``config.json`` (or of a config dict, with its ``model_type``) on the
    meta device: shapes only, nothing allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(path, dict):
        config = AutoConfig.for_model(path["model_type"], **{k: v for k, v in path.items() if k != "model_type"})
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def unquantizable(
    path: str, device: str, trust_remote_code: bool = False, experts_per_matrix: bool = False
) -> tuple[list[str], list[str]]:
    """(layers bitsandbytes cannot run in 4-bit on ``device``, transformers' default skips).
    ``experts_per_matrix``: count MoE experts as they then load, one linear layer per matrix."""
    from transformers.quantizers.base import get_keys_to_not_convert

    meta = meta_model(path, trust_remote_code)
    if experts_per_matrix:
        unfuse_(meta)
    return skip_for_device(meta, device), get_keys_to_not_convert(meta)


def refuse_prequantized(path: str) -> None:
    """One line for a checkpoint another method quantized (gpt-oss's MXFP4 experts, GPTQ, AWQ, FP8):
    QOLoRA quantizes the 16-bit weights itself, and its inits read them from the checkpoint."""
    from transformers import PretrainedConfig

    q = PretrainedConfig.get_config_dict(path)[0].get("quantization_config") or {}
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method and method != "bitsandbytes":
        raise ValueError(
            f"{path}/config.json: the checkpoint is already quantized (quant_method {method!r}); QOLoRA quantizes "
            "16-bit weights itself: use the model's bf16 or fp16 release (for gpt-oss, a dequantized copy such as "
            "unsloth/gpt-oss-20b-BF16)"
        )


def load_quantized(
    path_or_id: str | os.PathLike[str],
    *,
    compute_dtype: str | torch.dtype = "auto",
    dtype: str | torch.dtype | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    device_map: Any = None,
    skip_modules: list[str] | None = None,
    trust_remote_code: bool = False,
    quant_storage: str | torch.dtype | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM with its linear layers in 4-bit NF4 (double quantization on by default).

    Args:
        path_or_id: a local model folder, or a hub id that is in the local cache.
        compute_dtype: "auto" (bf16 on CUDA with bf16, fp16 on older CUDA, fp32 on CPU) or a name.
        dtype: dtype of the unquantized parameters (embeddings, norms); default: compute_dtype.
        quant_type: "nf4" (default) or "fp4".
        double_quant: quantize the absmax statistics too (QLoRA's double quantization).
        device_map: passed to ``from_pretrained``; default: the first CUDA device, else CPU.
        skip_modules: linear layers to keep unquantized besides transformers' defaults (lm_head);
            default: those bitsandbytes cannot run on the target device (on the CPU,
            in_features % 64 or out_features % 32 not 0), logged with their memory cost.
        trust_remote_code: off unless you turn it on.
        quant_storage: dtype of the packed 4-bit storage; default uint8. "compute" stores it as the
            compute dtype, as FSDP-QLoRA needs (FSDP shards the packed bytes as parameters of that dtype).

    Returns:
        A ``PreTrainedModel`` whose linear layers (but lm_head and the skipped ones) are
        ``bnb.nn.Linear4bit`` in bitsandbytes' standard layout (its lossy CPU repacking is off);
        embeddings and norms have ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(path_or_id)
    cdtype = resolve_compute_dtype(compute_dtype).dtype
    pdtype = parse_dtype(dtype, "dtype") if dtype is not None else cdtype
    if isinstance(quant_storage, str) and quant_storage != "compute":
        raise ValueError(f'quant_storage: {quant_storage!r}; give a torch.dtype, "compute" or None (uint8)')
    storage = cdtype if quant_storage == "compute" else quant_storage or torch.uint8
    if device_map is None:
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    device = _device_type(device_map)
    refuse_prequantized(path)
    per_matrix = stores_experts_per_matrix(path)  # MoE experts then load one 4-bit layer per matrix
    odd, defaults = unquantizable(path, device, trust_remote_code, per_matrix)
    if skip_modules is None:
        skip_modules = odd
        if odd:
            logger.warning(
                "keeping %d linear layers unquantized: bitsandbytes cannot run them in 4-bit on the %s "
                "(in_features %% 64 or out_features %% 32 not 0): %s",
                len(odd),
                device,
                ", ".join(odd[:6]),
            )
    skipped = sorted(set(defaults) | set(skip_modules))
    with linear_subclasses_as_linear(), unfused_experts_loading(per_matrix):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=bnb_config(cdtype, quant_type, double_quant, storage, skip_modules=skipped),
            dtype=pdtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    keep_standard_layout_(model)
    silent = full_precision_linears(model, set(skipped))
    if silent:
        logger.warning(
            "%d linear layers stayed in full precision (%s: transformers' 4-bit conversion does not cover their "
            "type), %.1f MiB more than 4-bit: %s",
            len(silent),
            ", ".join(sorted({type(model.get_submodule(n)).__name__ for n, _ in silent})),
            sum(b for _, b in silent) / 2**20,
            ", ".join(n for n, _ in silent[:6]) + (", ..." if len(silent) > 6 else ""),
        )
    fused = fused_left(model)
    if fused:
        logger.warning(
            "%d MoE experts modules stayed in 16 bits (%.1f MiB): the checkpoint stores them fused, not one matrix "
            "each, and bitsandbytes quantizes linear layers only: %s",
            len(fused),
            sum(b for _, b in fused) / 2**20,
            ", ".join(n for n, _ in fused[:4]) + (", ..." if len(fused) > 4 else ""),
        )
    if skip_modules:
        kept = set(skip_modules)
        extra = sum(
            m.weight.numel() * (m.weight.element_size() - 0.5)
            for n, m in model.named_modules()
            if n in kept and hasattr(m, "weight")
        )
        logger.info("the unquantized layers cost %.1f MiB more than 4-bit would", extra / 2**20)
    logger.info(
        "loaded %s in 4-bit %s (double quant %s, compute %s, dtype %s)", path, quant_type, double_quant, cdtype, pdtype
    )
    return model


def load_base(
    path_or_id: str | os.PathLike[str],
    *,
    quant_type: str = "nf4",
    compute_dtype: str | torch.dtype = "auto",
    dtype: str | torch.dtype | None = None,
    double_quant: bool = True,
    skip_modules: list[str] | None = None,
    device_map: Any = None,
    quant_storage: str | torch.dtype | None = None,
) -> PreTrainedModel:
    """The one base-model loader of ``qolora train``, ``qolora init`` and adapter reloads.

    ``quant_type`` "nf4"/"fp4": ``load_quantized``; "none": unquantized, in ``dtype`` (default:
    the resolved compute dtype).
    """
    if quant_type == "none":
        from transformers import AutoModelForCausalLM

        pdtype = parse_dtype(dtype, "dtype") if dtype is not None else resolve_compute_dtype(compute_dtype).dtype
        return AutoModelForCausalLM.from_pretrained(resolve_model(path_or_id), dtype=pdtype, device_map=device_map)
    return load_quantized(
        path_or_id,
        compute_dtype=compute_dtype,
        dtype=dtype,
        quant_type=quant_type,
        double_quant=double_quant,
        device_map=device_map,
        skip_modules=skip_modules,
        quant_storage=quant_storage,
    )
