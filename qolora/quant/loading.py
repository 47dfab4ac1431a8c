"""Load a transformers causal LM with NF4 linear layers through bitsandbytes."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..precision import resolve_compute_dtype

logger = logging.getLogger(__name__)


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


def load_quantized(
    path_or_id: str | os.PathLike[str],
    *,
    compute_dtype: str | torch.dtype = "auto",
    quant_type: str = "nf4",
    double_quant: bool = True,
    device_map: Any = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Load a causal LM with its linear layers in 4-bit NF4 (double quantization on by default).

    Args:
        path_or_id: a local model folder, or a hub id that is in the local cache.
        compute_dtype: "auto" (bf16 on CUDA with bf16, fp16 on older CUDA, fp32 on CPU) or a name.
        quant_type: "nf4" (default) or "fp4".
        double_quant: quantize the absmax statistics too (QLoRA's double quantization).
        device_map: passed to ``from_pretrained``; default: the first CUDA device, else CPU.
        trust_remote_code: off unless you turn it on.

    Returns:
        A ``PreTrainedModel`` whose linear layers (but lm_head) are ``bnb.nn.Linear4bit``;
        embeddings and norms keep ``compute_dtype``.
    """
    from transformers import AutoModelForCausalLM

    path = os.fspath(path_or_id)
    if os.path.sep in path and not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    dtype = resolve_compute_dtype(compute_dtype).dtype
    if device_map is None:
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb_config(dtype, quant_type, double_quant),
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    logger.info("loaded %s in 4-bit %s (double quant %s, compute %s)", path, quant_type, double_quant, dtype)
    return model
