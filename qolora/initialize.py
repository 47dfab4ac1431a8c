"""Per-layer factored initialization (OLoRA, PiSSA, LoftQ) of a PEFT LoRA model, and its exact replay at reload.

Each target layer is handled on its own: fetch W (one tensor), factor, write the residual,
drop W. Extra memory is therefore about one layer's float32 weight (docs/design.md, invariant 5).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from . import quant
from .choices import INIT_SOURCES
from .inits import InitSpec, Roundtrip, factor
from .olora import balance_factors, check_rank, subtract_lowrank_
from .report import InitReport, LayerReport

logger = logging.getLogger(__name__)

InitSource = Literal[INIT_SOURCES]
# A checkpoint tensor further than this from the loaded 4-bit weight is not that weight (NF4's
# own relative error is about 0.1).
_MATCH_TOLERANCE = 0.5


@dataclass
class Target:
    """One LoRA-wrapped linear layer: its name in the transformers model and its PEFT layer."""

    name: str
    lora: nn.Module

    @property
    def base(self) -> nn.Module:
        return self.lora.get_base_layer()

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.lora, "fan_in_fan_out", False))

    def shape(self) -> tuple[int, int]:
        """(out, in) of the logical weight."""
        base = self.base
        if quant.is_4bit(base):
            return int(base.out_features), int(base.in_features)
        w = base.weight
        return (int(w.shape[1]), int(w.shape[0])) if self.fan_in_fan_out else (int(w.shape[0]), int(w.shape[1]))


def iter_targets(peft_model: nn.Module, adapter_name: str) -> Iterator[Target]:
    """The LoRA layers of ``adapter_name``, by their names in the transformers model.

    Raises:
        ValueError: naming a targeted layer OLoRA cannot factor (embeddings, convolutions).
    """
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            if not (isinstance(base, nn.Linear) or quant.is_4bit(base) or _is_conv1d(base)):
                raise ValueError(f"{name}: OLoRA supports linear layers only, got {type(base).__name__}")
            yield Target(name, module)
        elif adapter_name in getattr(module, "lora_embedding_A", {}):
            raise ValueError(f"{name}: OLoRA supports linear layers only; remove embeddings from target_modules")


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class WeightSource:
    """Gives each target layer's original weight W: (out, in) float32 on the layer's device.

    Args:
        model: the transformers model (inside the PeftModel).
        init_source: "auto" (checkpoint where it exists, else the dequantized copy, logged),
            "checkpoint" (required; an error if missing) or "dequantized".
        checkpoint: the folder of the original safetensors; default: found from the model's
            ``name_or_path`` locally or in the local HF cache.
    """

    def __init__(
        self, model: nn.Module, init_source: str = "auto", checkpoint: str | os.PathLike[str] | None = None
    ) -> None:
        if init_source not in INIT_SOURCES:
            raise ValueError(f"init_source: expected one of {INIT_SOURCES}, got {init_source!r}")
        self.init_source = init_source
        self.folder: Path | None = None
        self.ckpt: quant.CheckpointWeights | None = None
        if checkpoint is not None:
            self.folder = Path(checkpoint)
            self.ckpt = quant.CheckpointWeights(self.folder)
        elif init_source != "dequantized":
            found = quant.find_checkpoint(getattr(model, "name_or_path", None))
            if found is not None:
                self.folder, self.ckpt = found, quant.CheckpointWeights(found)
        prefix = getattr(model, "base_model_prefix", "")
        self.prefixes = (prefix,) if prefix else ()
        self._warned = False
        self.transposed: set[str] = set()

    def get(self, t: Target, require: str | None = None) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        """W for one layer.

        Args:
            require: replay a recorded source ("checkpoint", "dequantized", "module") exactly.

        Returns:
            (W, source, W_4bit): W float32 (out, in) and a fresh tensor; W_4bit is the current
            dequantized weight of a 4-bit layer (None otherwise).
        """
        base = t.base
        if not quant.is_4bit(base):
            w = base.weight.detach()
            if w.dtype == torch.float32 and not t.fan_in_fan_out:
                return w, "module", None  # worked on in place, as PEFT does: no copy
            return (w.T if t.fan_in_fan_out else w).to(torch.float32, copy=True).contiguous(), "module", None
        W4 = quant.dequantize(base)
        want_ckpt = require == "checkpoint" or (require is None and self.init_source != "dequantized")
        if want_ckpt:
            W, why = self._from_checkpoint(t, W4)
            if W is not None:
                return W, "checkpoint", W4
            if require == "checkpoint" or self.init_source == "checkpoint":
                raise ValueError(f"{t.name}: init_source='checkpoint' but {why}")
            self._warn_fallback(t.name, why)
        return W4.clone(), "dequantized", W4

    def _from_checkpoint(self, t: Target, W4: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        if self.ckpt is None:
            return None, "no original safetensors checkpoint was found for this model"
        key = self.ckpt.find(t.name, self.prefixes)
        if key is None:
            return None, f"{self.folder} has no tensor for {t.name}.weight"
        out, inp = t.shape()
        shape = self.ckpt.shape(key)
        if shape not in ((out, inp), (inp, out)):
            return None, f"{self.folder}: {key} has shape {shape}, the layer is {out}x{inp}"
        raw = self.ckpt.get(key, device=W4.device)
        # Conv1D checkpoints store (in, out); square ones are told apart by which orientation
        # the loaded 4-bit weight matches.
        candidates = [c.contiguous() for c in (raw, raw.T) if tuple(c.shape) == (out, inp)]
        dists = [float(torch.dist(c, W4)) for c in candidates]
        W, dist = min(zip(candidates, dists), key=lambda cd: cd[1])
        if W.data_ptr() != raw.data_ptr():  # the (in, out) orientation won
            self.transposed.add(t.name)
        diff = dist / max(float(torch.linalg.vector_norm(W)), 1e-30)
        if diff > _MATCH_TOLERANCE:
            return None, f"{self.folder}: {key} does not match the loaded weight (relative difference {diff:.2f})"
        return W, ""

    def _warn_fallback(self, name: str, why: str) -> None:
        if not self._warned:
            logger.warning(
                "OLoRA on the dequantized 4-bit weights (first at %s: %s). The residual is then "
                "quantized a second time and the initial model's weight error is higher than plain "
                "QLoRA's. Load the model from a local folder with safetensors, or pass checkpoint=.",
                name,
                why,
            )
            self._warned = True


def _warn_full_precision_targets(targets: list[Target]) -> None:
    """On a 4-bit base, one warning naming the targets that are not 4-bit: their residual stays in
    full precision (no quantization error to win back; the report's ratio is nan for them)."""
    four = [quant.is_4bit(t.base) for t in targets]
    if any(four) and not all(four):
        names = [t.name for t, q in zip(targets, four) if not q]
        logger.warning(
            "%d of %d targets are not 4-bit on this 4-bit base (%s%s): they are factored from their own "
            "full-precision weight, and their residual stays in full precision",
            len(names),
            len(targets),
            ", ".join(names[:4]),
            ", ..." if len(names) > 4 else "",
        )


@dataclass
class InitResult:
    """What ``init_factored_`` produced: the report, the initial factors, the base's factors where they
    differ from the initial ones (loftq), the checkpoint used."""

    report: InitReport
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    checkpoint: Path | None = None
    transposed: set[str] = field(default_factory=set)
    base_factors: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)


def _write_base_(t: Target, W_res: torch.Tensor) -> None:
    """Store the residual as the frozen base weight: re-quantized once, or cast in place."""
    base = t.base
    if quant.is_4bit(base):
        quant.requantize_(base, W_res)
    elif W_res.data_ptr() != base.weight.data_ptr():
        w = base.weight
        w.data.copy_((W_res.T if t.fan_in_fan_out else W_res).to(w.dtype))


def _rel(x: torch.Tensor, ref_norm: float) -> float:
    return float(torch.linalg.vector_norm(x)) / ref_norm if ref_norm > 0 else 0.0


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A factor's value in the adapter dtype, as float32 (the residual is taken from it)."""
    return x.to(dtype).to(torch.float32)


def _roundtrip(t: Target) -> Roundtrip:
    """What the layer's base would hold for a residual: its own NF4 settings, or its dtype's cast."""
    base = t.base
    if quant.is_4bit(base):
        settings = quant.quant_settings(base)
        return lambda X: quant.roundtrip(X, settings)
    return functools.partial(_cast, dtype=base.weight.dtype)


def init_factored_(
    peft_model: nn.Module,
    spec: InitSpec,
    adapter_name: str = "default",
    init_source: str = "auto",
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    balance: bool = False,
) -> InitResult:
    """Initialize every LoRA layer of ``adapter_name`` by ``spec``; rewrites the frozen base in place.

    Per layer: W from ``WeightSource``; B, A and the base's factors from ``inits.factor`` (with
    ``balance``, then ``balance_factors``: same product, rescaled per component) cast to the adapter
    dtype; base ← W − s·base_B·base_A (quantized once on a 4-bit base). One layer's W and two
    (out, in) float32 temporaries are alive at a time (docs/design.md, invariant 5).

    Note:
        The reported error uses ‖W_res − base‖ for olora and pissa, which equals ‖W − (base + s·B·A)‖
        up to the float32 rounding of the subtraction and saves a second (out, in) matmul per layer;
        loftq's adapter factors are not its residual's, so its error is measured in full.
    """
    source = WeightSource(peft_model.base_model.model, init_source, checkpoint)
    result = InitResult(InitReport(spec.label, init_source), checkpoint=source.folder)
    targets = list(iter_targets(peft_model, adapter_name))
    if not targets:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers; check target_modules")
    _warn_full_precision_targets(targets)
    t_all = time.perf_counter()
    for t in tqdm(targets, desc=f"{spec.label} init", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        r, scale = int(t.lora.r[adapter_name]), float(t.lora.scaling[adapter_name])
        check_rank(r, t.shape(), t.name)
        W, src, W4 = source.get(t)
        w_norm = float(torch.linalg.vector_norm(W))
        qlora_err = _rel(W4.sub_(W), w_norm) if W4 is not None else 0.0
        del W4
        lora_A, lora_B = t.lora.lora_A[adapter_name].weight, t.lora.lora_B[adapter_name].weight

        try:
            f = factor(W, r, scale, spec, _roundtrip(t), functools.partial(_cast, dtype=lora_A.dtype))
        except ValueError as e:
            raise ValueError(f"{t.name}: {e}") from e
        B, A = balance_factors(f.B, f.A) if balance else (f.B, f.A)
        lora_A.data = A.to(device=lora_A.device, dtype=lora_A.dtype)
        lora_B.data = B.to(device=lora_B.device, dtype=lora_B.dtype)
        W_orig = W.clone() if spec.method == "loftq" else None
        if f.base_B is f.B:  # the residual of the adapter's own factors, as stored
            subtract_lowrank_(W, lora_B.detach(), lora_A.detach(), scale)
        elif f.base_B is not None:
            subtract_lowrank_(W, f.base_B, f.base_A, scale)
        _write_base_(t, W)
        err = _stored_error(t, W, w_norm) if W_orig is None else _model_error(t, W_orig, lora_B, lora_A, scale)
        del W, W_orig
        result.factors[t.name] = (lora_B.detach().clone(), lora_A.detach().clone())
        if f.base_B is not f.B:
            result.base_factors[t.name] = None if f.base_B is None else (f.base_B.clone(), f.base_A.clone())
        result.report.layers.append(LayerReport(t.name, t.shape(), src, time.perf_counter() - t0, err, qlora_err))
    result.report.seconds = time.perf_counter() - t_all
    result.transposed = set(source.transposed)
    logger.info("%s", result.report)
    return result


def _model_error(t: Target, W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> float:
    """‖W − (stored base + s·B·A)‖ / ‖W‖ in full."""
    base = t.base
    if quant.is_4bit(base):
        held = quant.dequantize(base)
    else:
        w = base.weight.detach()
        held = (w.T if t.fan_in_fan_out else w).to(torch.float32)
    held.addmm_(B.detach().to(torch.float32), A.detach().to(torch.float32), alpha=scale)
    return _rel(held.sub_(W), float(torch.linalg.vector_norm(W)))


def _stored_error(t: Target, W_res: torch.Tensor, w_norm: float) -> float:
    """‖W_res − stored base‖ / ‖W‖: the 4-bit quantization error, or the cast error (0 in fp32)."""
    base = t.base
    if quant.is_4bit(base):
        return _rel(quant.dequantize(base).sub_(W_res), w_norm)
    w = base.weight.detach()
    if w.dtype == torch.float32:
        return 0.0
    return _rel((w.T if t.fan_in_fan_out else w).to(torch.float32) - W_res, w_norm)


def restore_olora_(
    peft_model: nn.Module,
    adapter_name: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor] | None],
    sources: dict[str, str],
    checkpoint: str | os.PathLike[str] | None,
    progress: bool = True,
    origin: str = "initial factors",
) -> None:
    """Rebuild the residual base from recorded factors: no QR or SVD (docs/design.md, invariant 6).

    Replays exactly what ``init_factored_`` did per layer, with the same source for W, so the
    base is bit-identical to the one the adapter was trained on.

    Args:
        factors: per layer, the factors the base's residual was taken with (the initial factors for
            olora and pissa; loftq's previous round, or None where the base is W itself).

    Raises:
        ValueError: when the layers do not match the recorded ones; the message starts with
            ``origin`` (where the factors came from).
    """
    needs_ckpt = "checkpoint" in sources.values()
    source = WeightSource(peft_model.base_model.model, "checkpoint" if needs_ckpt else "dequantized", checkpoint)
    targets = list(iter_targets(peft_model, adapter_name))
    names = {t.name for t in targets}
    lost, unknown = sorted(names - set(factors)), sorted(set(factors) - names)
    if lost:
        raise ValueError(
            f"{origin}: no initial factors for {len(lost)} adapter layers (first: {lost[0]}); "
            "the file is incomplete: restore it from the run folder"
        )
    if unknown:
        raise ValueError(f"{origin}: factors for layers the model does not have: {unknown[:3]}")
    for t in tqdm(targets, desc="QOLoRA restore", unit="layer", disable=not progress):
        W, _, _ = source.get(t, require=sources[t.name])
        pair = factors[t.name]
        if pair is not None:
            subtract_lowrank_(W, pair[0].to(W.device), pair[1].to(W.device), float(t.lora.scaling[adapter_name]))
        _write_base_(t, W)
        del W
