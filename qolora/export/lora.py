"""Portable LoRA: a standard rank-2r PEFT adapter that applies to the *original* base.

After an OLoRA init the base holds W − s·B0·A0, so the trained adapter alone is wrong on the
original weights. With B' = [B, −B0] and A' = [A; A0], B'·A' = B·A − B0·A0, and the original
base plus this adapter equals the ``original`` merged export.

MoE experts, which QOLoRA adapts as one linear layer per expert matrix, are written as PEFT's
``target_parameters`` on the fused 3-D experts that stock transformers holds (``fused_experts``):
each expert's rank-2r factors become its slice of the parameter's LoRA, in PEFT's layout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import quant
from .._io import atomic_dir, peak_rss_bytes
from ..adapter_dir import PEFT_PREFIX, AdapterDir
from ..files import ADAPTER_CONFIG_FILE, WEIGHTS_FILE
from .common import read_adapter
from .merged import _PREFIXES, ExportResult, merged_weight

logger = logging.getLogger(__name__)


def portable_alpha(alpha: float, rslora: bool) -> float:
    """alpha' such that the rank-2r scale equals the rank-r one (alpha/r, or alpha/sqrt(r))."""
    return alpha * (math.sqrt(2.0) if rslora else 2.0)


def export_lora(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    measure_gap: bool = False,
) -> ExportResult:
    """Write the rank-2r adapter; optionally measure its gap to the trained model.

    Returns:
        The export result; with ``measure_gap`` its ``gap`` is the mean over layers of
        ‖W_original_merge − W_trained_merge‖_F / ‖W_trained_merge‖_F: the residual's NF4 error
        that the portable adapter leaves out (None otherwise).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    parts = read_adapter(adapter_dir, checkpoint)
    c = dict(parts.config)
    rslora = bool(c.get("use_rslora"))
    portable: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (B, A) in parts.weights.items():
        if parts.meta.factored:
            B0, A0 = parts.initial[name]
            B, A = torch.cat([B, -B0.to(B.dtype)], dim=1), torch.cat([A, A0.to(A.dtype)], dim=0)
        else:  # plain LoRA: pad with zeros so every layer has rank 2r
            B, A = torch.cat([B, torch.zeros_like(B)], dim=1), torch.cat([A, torch.zeros_like(A)], dim=0)
        portable[name] = (B, A)
    experts = [n for n in portable if EXPERT_LAYER.match(n)]
    tensors: dict[str, torch.Tensor] = {}
    for name, (B, A) in portable.items():
        if name not in experts:
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    c["r"] = 2 * int(c["r"])
    c["lora_alpha"] = portable_alpha(float(c["lora_alpha"]), rslora)
    c["rank_pattern"] = {k: 2 * int(v) for k, v in (c.get("rank_pattern") or {}).items()}
    c["alpha_pattern"] = {k: portable_alpha(float(v), rslora) for k, v in (c.get("alpha_pattern") or {}).items()}
    if experts:
        tensors.update(fused_experts(parts, {n: portable[n] for n in experts}, c, rslora))
    c["init_lora_weights"] = True  # a plain LoRA now: nothing to re-derive from the base
    c["base_model_name_or_path"] = str(parts.checkpoint)
    c["inference_mode"] = True
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(c, indent=2) + "\n")
    gap = _gap(parts) if measure_gap else None
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    result = ExportResult(
        out, time.perf_counter() - t0, nbytes, peak_rss_bytes(), len(tensors), len(parts.weights), gap
    )
    logger.info("%s", result)
    return result


EXPERT_LAYER = re.compile(r"^(?P<experts>.*\.experts)\.(?P<e>\d+)\.(?P<matrix>\w+)$")


def fused_experts(
    parts: AdapterDir, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], c: dict[str, Any], rslora: bool
) -> dict[str, torch.Tensor]:
    """The expert layers' rank-2r ``adapters`` as PEFT ``target_parameters`` on the fused experts of
    stock transformers; ``c`` (the PEFT config) gets the targets, ranks and alphas.

    Stock transformers holds each experts module as ``gate_up_proj`` (one expert's gate and up
    matrices stacked, or gpt-oss's interleaved one) and ``down_proj``. PEFT gives a 3-D parameter of
    E experts one LoRA with A of (R·E, in) and B of (out, R·E): expert e's factors are A[e·R:(e+1)·R]
    and B.view(out, R, E)[..., e]. An expert's gate and up factors stack block-diagonally (rank 4r),
    its down factors keep rank 2r, and each layer's scale is folded into its B (alpha = R: scale 1).
    The layout is read from PEFT itself, on the meta model, and every shape is checked against it.
    """
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora.layer import ParamWrapper

    from ..quant.experts import InterleavedExpert, fused_parts, is_interleaved_experts, stored_names
    from ..quant.loading import meta_model

    stock = meta_model(str(parts.checkpoint))
    names = stored_names(stock)
    by_module: dict[str, dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for name, (B, A) in adapters.items():
        m = EXPERT_LAYER.match(name)
        assert m is not None
        s = parts.scale(name)
        by_module.setdefault(m["experts"], {}).setdefault(int(m["e"]), {})[m["matrix"]] = (B.float() * s, A.float())
    plan: dict[str, dict[str, list[str]]] = {}  # experts module -> fused parameter -> the expert matrices in it
    for path in by_module:
        fused = stock.get_submodule(path)
        if is_interleaved_experts(fused):
            plan[path] = fused_parts(InterleavedExpert.names)
        elif names is not None:
            plan[path] = fused_parts(names)
        else:
            raise ValueError(f"{path}: {type(fused).__name__} is no experts module a portable LoRA can target")
    # one rank per fused parameter (PEFT's rank_pattern keys a parameter target by "module.parameter")
    ranks = {
        f"{path}.{p}": max(sum(mats[m][0].shape[1] for m in ms) for mats in by_module[path].values())
        for path in sorted(plan)
        for p, ms in plan[path].items()
    }
    others = [n for n in parts.weights if n not in adapters]
    c["target_modules"] = others or None
    c["target_parameters"] = list(ranks)
    c["rank_pattern"] = {**(c.get("rank_pattern") or {}), **ranks}
    alphas = {k: math.sqrt(r) if rslora else float(r) for k, r in ranks.items()}  # scale 1: s is in B
    c["alpha_pattern"] = {**(c.get("alpha_pattern") or {}), **alphas}
    c["lora_dropout"] = 0.0  # PEFT's parameter targets take none (an inference adapter uses none)
    with init_empty_weights():
        cfg = {k: v for k, v in c.items() if k in LoraConfig.__dataclass_fields__}
        peft_model = get_peft_model(stock, LoraConfig(**{**cfg, "inference_mode": True, "init_lora_weights": True}))
    layout = get_peft_model_state_dict(peft_model)
    out: dict[str, torch.Tensor] = {}
    for module_name, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, ParamWrapper):
            continue
        path = module_name.removeprefix("base_model.model.").replace(".base_layer", "")
        experts = by_module[path]
        num, rank = wrapper.num_experts, ranks[f"{path}.{wrapper.parameter_name}"]
        if sorted(experts) != list(range(num)):
            raise ValueError(f"{path}: adapters on experts {sorted(experts)}, the model has {num}")
        A_w = torch.zeros(rank * num, wrapper.in_features)
        B_w = torch.zeros(wrapper.out_features, rank, num)
        for e, mats in experts.items():
            parts_of = [mats[m] for m in plan[path][wrapper.parameter_name]]
            B_e, A_e = torch.block_diag(*(b for b, _ in parts_of)), torch.cat([a for _, a in parts_of])
            A_w[e * rank : e * rank + A_e.shape[0]] = A_e
            B_w[:, : B_e.shape[1], e] = B_e
        for kind, t in (("lora_A", A_w), ("lora_B", B_w.reshape(wrapper.out_features, rank * num))):
            key = f"{module_name}.{kind}.weight"
            if key not in layout or tuple(layout[key].shape) != tuple(t.shape):
                want = tuple(layout[key].shape) if key in layout else "no tensor"
                raise ValueError(f"{key}: PEFT expects {want}, got {tuple(t.shape)}")
            out[key] = t.contiguous()
    return out


def _gap(parts: AdapterDir) -> float:
    """Mean relative weight difference between the original-base merge and the trained merge."""
    if parts.meta.quant is None:
        return 0.0
    ckpt = quant.CheckpointWeights(parts.checkpoint)
    gaps = []
    for name in parts.weights:
        key = ckpt.find(name, _PREFIXES)
        W = ckpt.get(key)
        if name in parts.meta.transposed:
            W = W.T.contiguous()
        trained = merged_weight(parts, name, W.clone(), "trained", "cpu")
        original = merged_weight(parts, name, W, "original", "cpu")
        gaps.append(float(torch.linalg.vector_norm(original - trained) / torch.linalg.vector_norm(trained)))
    return sum(gaps) / len(gaps)
