"""Portable LoRA: a standard rank-2r PEFT adapter that applies to the *original* base.

After an OLoRA init the base holds W − s·B0·A0, so the trained adapter alone is wrong on the
original weights. With B' = [B, −B0] and A' = [A; A0], B'·A' = B·A − B0·A0, and the original
base plus this adapter equals the ``original`` merged export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

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
    tensors: dict[str, torch.Tensor] = {}
    for name, (B, A) in parts.weights.items():
        if parts.meta.factored:
            B0, A0 = parts.initial[name]
            B, A = torch.cat([B, -B0.to(B.dtype)], dim=1), torch.cat([A, A0.to(A.dtype)], dim=0)
        else:  # plain LoRA: pad with zeros so every layer has rank 2r
            B, A = torch.cat([B, torch.zeros_like(B)], dim=1), torch.cat([A, torch.zeros_like(A)], dim=0)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    c["r"] = 2 * int(c["r"])
    c["lora_alpha"] = portable_alpha(float(c["lora_alpha"]), rslora)
    c["rank_pattern"] = {k: 2 * int(v) for k, v in (c.get("rank_pattern") or {}).items()}
    c["alpha_pattern"] = {k: portable_alpha(float(v), rslora) for k, v in (c.get("alpha_pattern") or {}).items()}
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
