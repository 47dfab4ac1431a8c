"""Keep every 4-bit layer in bitsandbytes' standard layout, on every device (docs/design.md,
invariant 9), and find the layers bitsandbytes cannot run where the model will live.

bitsandbytes 0.50.2 repacks a ``Linear4bit`` on its first eval-mode, no-grad forward on a CPU
that reports AVX512-BF16 (``_convert_weight_packed_for_cpu``). That path:
  * stores the absmax statistics as bf16 and drops double quantization, and its inverse (run
    by every ``state_dict()``) re-quantizes them with a new offset: the dequantized base moves
    by ~0.2% relative per eval + save cycle;
  * has no autograd kernel: a training forward after an eval pass returns no input gradient,
    so every adapter upstream of the layer trains on a wrong gradient;
  * computes in bf16 whatever the compute dtype (output off by ~3e-3 relative in fp32).
It is neither exact nor differentiable, so QOLoRA switches it off on every layer it touches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .nf4 import is_4bit, is_8bit, is_repacked

logger = logging.getLogger(__name__)

# bitsandbytes 0.50.2's CPU kernels: in_features must be a multiple of the blocksize, and
# out_features of the packing block ("N must be divisible by block_n").
CPU_IN_MULTIPLE, CPU_OUT_MULTIPLE = 64, 32


def cpu_packing_available() -> bool:
    """True where bitsandbytes would use its packed AVX512-BF16 CPU eval path."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def _unpack_(layer: nn.Module) -> None:
    """Undo the packed layout (bitsandbytes' own inverse; lossy for the absmax statistics)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    layer.quant_state = weight.quant_state


def keep_standard_layout_(model: nn.Module) -> None:
    """Switch bitsandbytes' CPU repacking off on every 4-bit layer of ``model``, in place.

    A layer that was already repacked (a model the caller ran in eval mode) is converted back
    with a warning: its absmax statistics were rounded to bf16 and cannot be recovered exactly.
    """
    undone = []
    for name, m in model.named_modules():
        if not is_4bit(m):
            continue
        m.support_avx512bf16_for_cpu = False
        if is_repacked(m):
            _unpack_(m)
            undone.append(name)
    if undone:
        logger.warning(
            "%d 4-bit layers had been repacked by bitsandbytes' CPU eval path (first: %s); converted "
            "back, with absmax rounded to bf16: load the model with qolora.load_quantized for an exact base",
            len(undone),
            undone[0],
        )


def cpu_unsupported(shapes: Iterable[tuple[str, int, int]]) -> list[str]:
    """Names of (name, out_features, in_features) layers bitsandbytes' CPU 4-bit kernels crash on."""
    return [n for n, out_f, in_f in shapes if in_f % CPU_IN_MULTIPLE or out_f % CPU_OUT_MULTIPLE]


def linear_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of every linear layer, float or 4-bit."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):  # Linear4bit subclasses nn.Linear and keeps in/out_features
            out.append((name, int(m.out_features), int(m.in_features)))
    return out


def check_supported(model: nn.Module, device: str | torch.device) -> None:
    """Refuse a base QOLoRA cannot adapt exactly: 8-bit layers, or 4-bit layers bitsandbytes
    cannot run on this device.

    Raises:
        ValueError: naming the layers and what to do.
    """
    eight = [n for n, m in model.named_modules() if is_8bit(m)]
    if eight:
        raise ValueError(
            f"{len(eight)} layers are bitsandbytes 8-bit (first: {eight[0]}): QOLoRA supports a 4-bit NF4/FP4 "
            "or an unquantized base; load the model with qolora.load_quantized (4-bit) or without quantization"
        )
    if torch.device(device).type != "cpu":
        return
    bad = cpu_unsupported((n, int(m.out_features), int(m.in_features)) for n, m in model.named_modules() if is_4bit(m))
    if bad:
        raise ValueError(
            f"bitsandbytes cannot run these 4-bit layers on the CPU (in_features must be a multiple of "
            f"{CPU_IN_MULTIPLE}, out_features of {CPU_OUT_MULTIPLE}): {', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}; load the model with qolora.load_quantized, which keeps them unquantized"
        )


def skip_for_device(meta_model: Any, device: str | torch.device) -> list[str]:
    """Linear layers of ``meta_model`` to keep unquantized on ``device``: none off the CPU."""
    if torch.device(device).type != "cpu":
        return []
    return cpu_unsupported(linear_shapes(meta_model))
