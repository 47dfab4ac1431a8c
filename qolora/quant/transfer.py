"""A 4-bit model as plain tensors and back, bit for bit: how FSDP ranks other than 0 receive the base
that rank 0 loaded and initialized, without reading the checkpoint (``qolora.fsdp.load_sharded_``).

A bitsandbytes ``Params4bit`` is more than its packed bytes: its ``quant_state`` (absmax, codebook,
the nested absmax and offset, shape, dtype, blocksize) is no parameter, so a parameter broadcast
alone would leave the other ranks with a base that dequantizes to something else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .nf4 import _bnb, is_4bit


def twin_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What a meta-device copy of ``model`` needs to have the same 4-bit layers: per module name, the
    ``Linear4bit`` constructor's arguments (in/out features, bias, compute dtype, quant settings)."""
    out = {}
    for name, m in model.named_modules():
        if is_4bit(m):
            w = m.weight
            out[name] = {
                "input_features": int(m.in_features),
                "output_features": int(m.out_features),
                "bias": m.bias is not None,
                "compute_dtype": m.compute_dtype,
                "compress_statistics": bool(w.compress_statistics),
                "quant_type": str(w.quant_type),
                "quant_storage": w.data.dtype,
            }
    return out


def make_4bit_twin_(model: nn.Module, spec: dict[str, dict[str, Any]]) -> None:
    """Replace the named ``nn.Linear`` layers of a meta-device ``model`` by ``Linear4bit`` on meta, in place.

    Raises:
        ValueError: a named layer is missing or is not an ``nn.Linear`` of the recorded shape.
    """
    bnb = _bnb()
    modules = dict(model.named_modules())
    for name, kw in spec.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (
            kw["input_features"],
            kw["output_features"],
        ):
            raise ValueError(f"{name}: rank 0 has a 4-bit layer here that this model's config does not give")
        parent, _, child = name.rpartition(".")
        new = bnb.nn.Linear4bit(**kw, device="meta")
        new.support_avx512bf16_for_cpu = False  # bitsandbytes' packed CPU eval path: see layout.py
        setattr(modules[parent] if parent else model, child, new)


def set_weight_(layer: nn.Module, info: dict[str, Any], parts: dict[str, torch.Tensor]) -> None:
    """Give ``layer`` (a ``Linear4bit``, on meta or not) the weight ``nf4.weight_parts`` described, in place:
    the tensors are used as given (no copy, no re-quantization), so the base is bit-identical."""
    bnb = _bnb()
    functional = bnb.functional
    state2 = None
    if info["nested"]:
        s2 = info["state2"]
        state2 = functional.QuantState(
            absmax=parts["state2.absmax"], code=parts["state2.code"], blocksize=s2["blocksize"], dtype=s2["dtype"]
        )
    state = functional.QuantState(
        absmax=parts["absmax"],
        shape=torch.Size(info["shape"]),
        code=parts["code"],
        blocksize=info["blocksize"],
        quant_type=info["quant_type"],
        dtype=info["dtype"],
        offset=parts.get("offset"),
        state2=state2,
    )
    data = parts["data"]
    layer.weight = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        quant_state=state,
        blocksize=info["blocksize"],
        compress_statistics=info["nested"],
        quant_type=info["quant_type"],
        quant_storage=data.dtype,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    layer.support_avx512bf16_for_cpu = False
