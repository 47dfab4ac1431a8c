"""Resolve compute dtypes once, and say why.

Note: bf16 matmuls on the CPUs this project runs on are about 30x slower than fp32
(measured: 91 s vs 3.1 s for one forward+backward of a 135M model), so "auto" never
picks bf16 on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .choices import DTYPE_NAMES

logger = logging.getLogger(__name__)

_SHORT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_NAMES: dict[str, torch.dtype] = {n: getattr(torch, _SHORT.get(n, n)) for n in DTYPE_NAMES}


@dataclass(frozen=True)
class ResolvedDtype:
    """A dtype and the reason it was chosen."""

    dtype: torch.dtype
    reason: str


def parse_dtype(name: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """Map a dtype name ("bf16", "float32", ...) or a torch.dtype to a torch.dtype.

    Raises:
        ValueError: naming ``field`` and the bad value.
    """
    if isinstance(name, torch.dtype):
        if name not in _NAMES.values():
            raise ValueError(f"{field}: unsupported dtype {name}; use float32, float16 or bfloat16")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _NAMES:
        raise ValueError(f"{field}: unknown dtype {name!r}; use auto, float32, float16 or bfloat16")
    return _NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve_compute_dtype(name: str | torch.dtype = "auto", device: str | torch.device | None = None) -> ResolvedDtype:
    """Resolve a compute dtype; "auto" is bf16 on CUDA with bf16, fp16 on older CUDA, fp32 on CPU.

    Args:
        name: "auto" or a dtype name.
        device: where compute will run; default: CUDA if available, else CPU.
    """
    if not (isinstance(name, str) and name.lower() == "auto"):
        resolved = ResolvedDtype(parse_dtype(name, "compute_dtype"), "set explicitly")
    else:
        dev = torch.device(device) if device is not None else None
        on_cuda = torch.cuda.is_available() if dev is None else dev.type == "cuda"
        if on_cuda and torch.cuda.is_bf16_supported():
            resolved = ResolvedDtype(torch.bfloat16, "auto: CUDA device supports bf16")
        elif on_cuda:
            resolved = ResolvedDtype(torch.float16, "auto: CUDA device without bf16 support")
        else:
            resolved = ResolvedDtype(torch.float32, "auto: CPU, where bf16 matmuls are ~30x slower than fp32")
    logger.info("compute dtype %s (%s)", dtype_name(resolved.dtype), resolved.reason)
    return resolved
