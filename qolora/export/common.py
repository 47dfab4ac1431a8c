"""What both exports need: the adapter dir read back, the base checkpoint verified, per-layer scales."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import quant
from .._io import read_safetensors
from ..metadata import FACTORS_FILE, META_FILE, AdapterMeta

PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterParts:
    """An adapter dir, read: config, metadata, factors and the base checkpoint it belongs to."""

    dir: Path
    meta: AdapterMeta
    config: dict[str, Any]
    checkpoint: Path
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (B, A)
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (B0, A0)

    def rank_alpha(self, name: str) -> tuple[int, float]:
        from peft.utils.other import get_pattern_key

        c = self.config
        rp, ap = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        r = rp.get(get_pattern_key(list(rp), name), c["r"])
        alpha = ap.get(get_pattern_key(list(ap), name), c["lora_alpha"])
        return int(r), float(alpha)

    def scale(self, name: str) -> float:
        """The LoRA scale of one layer, as PEFT computes it (alpha / r, or alpha / sqrt(r) for rsLoRA)."""
        r, alpha = self.rank_alpha(name)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> AdapterParts:
    """Read and check an adapter dir and its base checkpoint; nothing is unpickled.

    Raises:
        FileNotFoundError: a missing adapter dir, file or base checkpoint (named).
        ValueError: a changed base checkpoint, or a config QOLoRA cannot export.
    """
    adir = Path(adapter_dir)
    if not adir.is_dir():
        raise FileNotFoundError(f"adapter dir {adir} does not exist")
    for name in ("adapter_config.json", "adapter_model.safetensors", META_FILE):
        if not (adir / name).is_file():
            raise FileNotFoundError(f"{adir / name} not found: {adir} is not a complete QOLoRA adapter dir")
    meta = AdapterMeta.read(adir)
    config = json.loads((adir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("lora_bias") or config.get("modules_to_save"):
        raise ValueError(f"{adir / 'adapter_config.json'}: DoRA, lora_bias and modules_to_save cannot be exported")
    folder = Path(checkpoint) if checkpoint is not None else Path(meta.checkpoint) if meta.checkpoint else None
    if folder is None:
        raise FileNotFoundError(f"{adir / META_FILE} records no base checkpoint; pass checkpoint=")
    if not folder.is_dir():
        raise FileNotFoundError(f"base checkpoint {folder} recorded in {adir / META_FILE} was not found")
    if meta.fingerprint is not None:
        why = quant.fingerprint_mismatch(meta.fingerprint, folder)
        if why:
            raise ValueError(f"base checkpoint does not match {adir / META_FILE}: {why}")
    parts = AdapterParts(adir, meta, config, folder)
    flat = read_safetensors(adir / "adapter_model.safetensors")
    for key in flat:
        if key.endswith(".lora_A.weight"):
            mod = key[: -len(".lora_A.weight")]
            name = mod.removeprefix(PEFT_PREFIX)
            parts.weights[name] = (flat[f"{mod}.lora_B.weight"], flat[key])
    if meta.init == "olora":
        if not (adir / FACTORS_FILE).is_file():
            raise FileNotFoundError(f"{adir / FACTORS_FILE} not found: OLoRA exports need the initial factors")
        f0 = read_safetensors(adir / FACTORS_FILE)
        try:
            parts.initial = {n: (f0[f"{n}.B0"], f0[f"{n}.A0"]) for n in parts.weights}
        except KeyError as e:
            raise ValueError(f"{adir / FACTORS_FILE}: no initial factor {e} for an adapter layer") from e
    return parts


def peak_rss_bytes() -> int:
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
