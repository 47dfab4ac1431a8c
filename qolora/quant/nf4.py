"""NF4 (de/re)quantization of bitsandbytes ``Linear4bit`` weights.

This is the only place, with ``loading.py``, that knows bitsandbytes' classes. The rest of
QOLoRA calls ``is_4bit``, ``quant_settings``, ``dequantize``, ``requantize_`` and
``roundtrip``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..precision import dtype_name, parse_dtype


def _bnb() -> Any:
    import bitsandbytes as bnb  # imported lazily: `import qolora` stays cheap and side-effect free

    return bnb


def _is_bnb(module: nn.Module, cls_name: str) -> bool:
    try:
        bnb = _bnb()
    except ImportError:
        return False
    return isinstance(module, getattr(bnb.nn, cls_name))


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (``bnb.nn.Linear4bit`` and subclasses)."""
    return _is_bnb(module, "Linear4bit")


def is_8bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 8-bit linear layer (``Linear8bitLt`` subclasses ``nn.Linear``)."""
    return _is_bnb(module, "Linear8bitLt")


def is_repacked(layer: nn.Module) -> bool:
    """True if bitsandbytes has converted this layer to its packed CPU layout (see layout.py)."""
    qs = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


@dataclass(frozen=True)
class QuantSettings:
    """Everything needed to quantize a weight the way an existing layer was quantized.

    Attributes:
        quant_type: "nf4" or "fp4".
        blocksize: elements per absmax block (64 is bitsandbytes' default).
        double_quant: whether the absmax statistics are themselves quantized.
        quant_storage: dtype of the packed storage tensor (uint8 by default).
        dtype: ``quant_state.dtype``, the dtype that dequantization returns.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: torch.dtype = torch.uint8
    dtype: torch.dtype = torch.float32

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quant_storage"] = dtype_name(self.quant_storage)
        d["dtype"] = dtype_name(self.dtype)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSettings:
        if not isinstance(d, dict):
            raise ValueError(f"quant settings must be a mapping, got {d!r}")
        return cls(
            quant_type=str(d["quant_type"]),
            blocksize=int(d["blocksize"]),
            double_quant=bool(d["double_quant"]),
            quant_storage=_storage_dtype(d["quant_storage"]),
            dtype=parse_dtype(d["dtype"], "quant.dtype"),
        )


def _storage_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"quant_storage: unknown dtype {name!r}")
    return dt


def _standard_layout(layer: nn.Module) -> None:
    """Refuse a layer in bitsandbytes' packed CPU layout: its data and absmax mean something else."""
    if is_repacked(layer):
        raise ValueError(
            "a 4-bit layer was repacked by bitsandbytes' CPU eval path; call "
            "qolora.quant.keep_standard_layout_(model) before running it (get_qolora_model does)"
        )


def quant_settings(layer: nn.Module) -> QuantSettings:
    """Read the quantization settings of a quantized ``Linear4bit`` layer."""
    _standard_layout(layer)
    weight = layer.weight
    qs = weight.quant_state
    if qs is None:
        raise ValueError(f"{type(layer).__name__} has no quant_state: it was never quantized")
    return QuantSettings(
        quant_type=qs.quant_type,
        blocksize=int(qs.blocksize),
        double_quant=bool(qs.nested),
        quant_storage=weight.data.dtype,
        dtype=qs.dtype,
    )


def weight_parts(layer: nn.Module) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """A ``Linear4bit`` weight as (settings, tensors), in order: the packed data, absmax and
    codebook, and with double quantization the offset, nested absmax and nested codebook. The
    settings hold the shape, dtype, quant type, blocksize and nesting (``transfer.set_weight_``)."""
    _standard_layout(layer)
    w = layer.weight
    qs = w.quant_state
    info: dict[str, Any] = {
        "shape": tuple(qs.shape),
        "dtype": qs.dtype,
        "blocksize": int(qs.blocksize),
        "quant_type": qs.quant_type,
        "nested": bool(qs.nested),
    }
    parts = [("data", w.data), ("absmax", qs.absmax), ("code", qs.code)]
    if qs.nested:
        info["state2"] = {"blocksize": int(qs.state2.blocksize), "dtype": qs.state2.dtype}
        parts += [("offset", qs.offset), ("state2.absmax", qs.state2.absmax), ("state2.code", qs.state2.code)]
    return info, parts


def state_tensors(layer: nn.Module) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """Everything a ``Linear4bit`` weight is made of: a description and its tensors (``weight_parts``).

    The description holds the shape, dtype, quant type, blocksize and storage dtype. Two layers
    with equal descriptions and bit-equal tensors dequantize alike.
    """
    info, parts = weight_parts(layer)
    data = layer.weight.data
    desc = f"{info['shape']} {info['dtype']} {info['quant_type']} bs{info['blocksize']} {data.dtype}{tuple(data.shape)}"
    if info["nested"]:
        desc += f" nested bs{info['state2']['blocksize']}"
    return desc, parts


def dequantize(layer: nn.Module) -> torch.Tensor:
    """Dequantize a ``Linear4bit`` weight.

    Returns:
        (out, in) float32 on the layer's device.
    """
    _standard_layout(layer)
    weight = layer.weight
    bnb = _bnb()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)


def quantize(W: torch.Tensor, settings: QuantSettings) -> tuple[torch.Tensor, Any]:
    """Quantize ``W`` with explicit settings.

    Args:
        W: (out, in) float tensor; quantized from float32 for accuracy.

    Returns:
        The packed storage tensor and its ``QuantState``, whose ``dtype`` is ``settings.dtype``.

    Note:
        The kernel runs on fp32 input and ``quant_state.dtype`` is then set to the recorded
        dtype. The dtype only selects what dequantization returns, so this keeps the layer's
        compute contract while not rounding the residual to bf16 before quantizing it.
    """
    bnb = _bnb()
    data, state = bnb.functional.quantize_4bit(
        W.to(torch.float32).contiguous(),
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
        quant_storage=settings.quant_storage,
    )
    state.dtype = settings.dtype
    return data, state


def requantize_(layer: nn.Module, W: torch.Tensor, settings: QuantSettings | None = None) -> None:
    """Replace a ``Linear4bit`` layer's weight with ``W`` quantized once, in place.

    Every setting of the existing weight survives: quant_type, blocksize, double quantization,
    quant_storage and ``quant_state.dtype``.

    Args:
        layer: a quantized ``bnb.nn.Linear4bit``; its frozen base weight is rewritten.
        W: (out, in) float tensor, the new full-precision weight.
        settings: defaults to the layer's current settings.
    """
    bnb = _bnb()
    settings = settings or quant_settings(layer)
    old = layer.weight
    device = W.device if old.device.type == "meta" else old.device  # a layer built on meta takes W's device
    data, state = quantize(W.to(device), settings)
    layer.weight = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        quant_state=state,
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
        quant_storage=settings.quant_storage,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    layer.support_avx512bf16_for_cpu = False  # bitsandbytes' packed CPU eval path: see layout.py


def roundtrip(W: torch.Tensor, settings: QuantSettings) -> torch.Tensor:
    """dequantize(quantize(W)): what a 4-bit layer holding ``W`` computes with; float32."""
    bnb = _bnb()
    data, state = quantize(W, settings)
    return bnb.functional.dequantize_4bit(data, state).to(torch.float32)


def linear4bit(
    W: torch.Tensor, settings: QuantSettings, compute_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> nn.Module:
    """A ``Linear4bit`` holding ``W`` (out, in) quantized once, on W's device, with no float copy
    of the layer ever allocated (synthetic 7B models are built this way, one matrix at a time)."""
    bnb = _bnb()
    out_f, in_f = W.shape
    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
        quant_storage=settings.quant_storage,
        device="meta",
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    requantize_(layer, W.detach(), settings)
    return layer


def quantize_linear(linear: nn.Linear, settings: QuantSettings, compute_dtype: torch.dtype) -> nn.Module:
    """Build a ``Linear4bit`` from a float ``nn.Linear`` (tests and synthetic benchmarks)."""
    return linear4bit(linear.weight.detach(), settings, compute_dtype, linear.bias)
