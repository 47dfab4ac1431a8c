"""A kernel self-check: trust a 4-bit layer's forward and backward on this device only after
comparing them with the same layer dequantized to fp32 (docs/design.md, invariant 10)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..precision import dtype_name
from .nf4 import dequantize, is_4bit, is_repacked

logger = logging.getLogger(__name__)


class KernelCheckError(ValueError):
    """A 4-bit kernel path gave a wrong result on this device; the message is one line."""


def tolerance(dtype: torch.dtype) -> float:
    """Allowed relative (Frobenius) error of a 4-bit layer's output or input gradient against
    fp32 math on the same dequantized weight.

    Note:
        The error of a correct kernel is the rounding of its compute dtype: measured 0 in fp32
        on the CPU and 2.4e-3 in bf16. The bound is 2x the dtype's machine epsilon (1.6e-2 bf16,
        2.0e-3 fp16), and 1e-4 in fp32 so that TF32 matmuls on CUDA pass while bitsandbytes'
        packed CPU path (bf16 inside, 3.1e-3 relative) does not.
    """
    if dtype == torch.float32:
        return 1e-4
    return 2.0 * torch.finfo(dtype).eps


@dataclass
class KernelCheck:
    """What ``check_kernel`` measured."""

    layer: str
    device: str
    dtype: str
    errors: dict[str, float]
    tolerance: float
    seconds: float

    def __str__(self) -> str:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        return (
            f"4-bit kernel check passed on {self.device} ({self.layer}, {self.dtype}): {errs} "
            f"(bound {self.tolerance:.1e}) in {self.seconds:.2f} s"
        )


def _rel(x: torch.Tensor | None, ref: torch.Tensor) -> float:
    if x is None:
        return float("inf")
    return float(torch.linalg.vector_norm(x.float() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def _fail(name: str, device: str, what: str) -> KernelCheckError:
    return KernelCheckError(
        f"4-bit kernel self-check failed on {device} at {name}: {what}; training would be silently wrong "
        "(set train.kernel_check: false only to debug)"
    )


def check_layer(name: str, layer: nn.Module, tokens: int = 16, seed: int = 0) -> KernelCheck:
    """Check one bitsandbytes ``Linear4bit`` on its own device, leaving it as it was.

    Runs an eval-mode no-grad forward (the path bitsandbytes switches on inference), then a
    train-mode forward and backward, and compares the output and the input gradient with
    ``x @ dequant(W).T`` in fp32. The dequantized weight must be bit-identical afterwards.

    Raises:
        KernelCheckError: naming the layer, the device and the error size.
    """
    t0 = time.perf_counter()
    W = dequantize(layer)  # (out, in) float32
    device = str(W.device)
    dtype = layer.compute_dtype or torch.float32
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(2, tokens, W.shape[1], generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(2, tokens, W.shape[0], generator=g).to(device=device, dtype=dtype)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    ref = torch.nn.functional.linear(x.float(), W, bias)
    ref_grad = gy.float() @ W
    tol = tolerance(dtype)
    was_training, errors = layer.training, {}
    try:
        layer.eval()
        with torch.no_grad():
            errors["eval out"] = _rel(layer(x), ref)
        layer.train()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(gy)
        errors["train out"] = _rel(y.detach(), ref)
        errors["input grad"] = _rel(xg.grad, ref_grad)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise _fail(name, device, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        layer.train(was_training)
    if is_repacked(layer):
        raise _fail(name, device, "bitsandbytes repacked the 4-bit weight during an eval forward")
    moved = float((dequantize(layer) - W).abs().max())
    if moved != 0.0:
        raise _fail(name, device, f"the dequantized base weight changed by up to {moved:.1e} during the check")
    for what, err in errors.items():
        if not err <= tol:  # also catches NaN and a missing gradient (inf)
            raise _fail(name, device, f"{what} relative error {err:.1e} > {tol:.1e} ({dtype_name(dtype)})")
    return KernelCheck(name, device, dtype_name(dtype), errors, tol, time.perf_counter() - t0)


def check_kernel(model: nn.Module) -> KernelCheck | None:
    """Check the first 4-bit layer of ``model`` (a PEFT-wrapped target where there is one).

    Returns:
        The measurement, or None when the model has no 4-bit layer.
    """
    for name, m in model.named_modules():
        if is_4bit(m):
            result = check_layer(name.removesuffix(".base_layer"), m)
            logger.info("%s", result)
            return result
    return None
