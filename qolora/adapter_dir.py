"""The adapter dir: PEFT's two files, ``qolora.json`` and ``initial_factors.safetensors``.

One writer (``write_adapter_dir``) and one reader (``read_adapter_dir``) that validates
everything once; ``load_adapter``, both exports and ``qolora eval`` go through it. The format
is described in docs/design.md ("File formats"). Version 1 dirs (no recorded data settings)
and version 2 dirs (OLoRA and LoRA only) are still read.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._io import atomic_dir, read_safetensors
from .choices import FACTORED_INITS, INITS
from .files import ADAPTER_CONFIG_FILE, FACTORS_FILE, META_FILE, RUN_CONFIG_FILE, WEIGHTS_FILE

FORMAT = "qolora-adapter"
FORMAT_VERSION = 3  # 2: records the data settings; 3: pissa, loftq and iterated inits (a v2 reader would misread them)
READABLE_VERSIONS = (1, 2, 3)
PEFT_PREFIX = "base_model.model."
DATA_KEYS = ("train", "template", "max_length", "completion_only")
BASE_KEYS = ("Bbase", "Abase")  # in FACTORS_FILE: loftq's base factors, beside each layer's B0 and A0

_PACKAGES = ("qolora", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class AdapterMeta:
    """The contents of ``qolora.json``.

    Attributes:
        init: "olora", "pissa", "loftq" or "lora" (``choices.INITS``).
        init_iters: quantization rounds of an iterated olora or of loftq (1 otherwise).
        svd_niter: pissa's randomized-SVD power iterations; None for the exact SVD.
        init_source: the requested source ("auto", "checkpoint", "dequantized").
        layer_sources: per target layer, where W came from ("checkpoint", "dequantized", "module").
        base_model: the base model's ``name_or_path`` as loaded.
        checkpoint: absolute folder of the base's safetensors, if there was one.
        fingerprint: ``qolora.quant.fingerprint`` of that folder.
        quant: the 4-bit settings (``QuantSettings.to_dict`` plus compute_dtype), None unquantized.
        dtype: dtype of the base's unquantized parameters.
        quantized_modules: names of the base's 4-bit linear layers (targets or not).
        transposed: target layers whose checkpoint tensor is stored (in, out), as Conv1D's is.
        data: the data settings of training (``DATA_KEYS``); None for an adapter not trained by
            ``qolora train``.
        training: how it was trained: ``method`` (``choices.METHODS``) and, for a preference
            method, its settings under TRL's names; None for an initial adapter.
    """

    init: str
    init_source: str
    layer_sources: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    checkpoint: str | None = None
    fingerprint: dict[str, Any] | None = None
    quant: dict[str, Any] | None = None
    dtype: str = "float32"
    adapter_name: str = "default"
    quantized_modules: list[str] = field(default_factory=list)
    transposed: list[str] = field(default_factory=list)
    data: dict[str, Any] | None = None
    init_iters: int = 1
    svd_niter: int | None = None
    training: dict[str, Any] | None = None

    @property
    def factored(self) -> bool:
        """True when the adapter started from factors of W (``initial_factors.safetensors`` exists)."""
        return self.init in FACTORED_INITS

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adapter_name": self.adapter_name,
            "base_model": {
                "name_or_path": self.base_model,
                "checkpoint": self.checkpoint,
                "fingerprint": self.fingerprint,
            },
            "quant": self.quant,
            "quantized_modules": self.quantized_modules,
            "dtype": self.dtype,
            "init": {
                "method": self.init,
                "iters": self.init_iters,
                "svd_niter": self.svd_niter,
                "init_source": self.init_source,
                "layer_sources": self.layer_sources,
                "transposed": self.transposed,
            },
            "data": self.data,
            "training": self.training,
            "versions": library_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def read(cls, adapter_dir: str | os.PathLike[str]) -> AdapterMeta:
        """Parse ``adapter_dir/qolora.json``; errors name the file and the field."""
        path = Path(adapter_dir) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {adapter_dir} is not a QOLoRA adapter dir")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else d
            raise ValueError(f"{path}: field 'format' is {got!r}, expected {FORMAT!r}")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: format_version {version!r} is not supported (this QOLoRA reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        try:
            base, init = d["base_model"], d["init"]
            return cls(
                init=init["method"],
                init_source=init["init_source"],
                layer_sources=dict(init.get("layer_sources", {})),
                base_model=base.get("name_or_path"),
                checkpoint=base.get("checkpoint"),
                fingerprint=base.get("fingerprint"),
                quant=d.get("quant"),
                quantized_modules=list(d.get("quantized_modules", [])),
                transposed=list(init.get("transposed", [])),
                dtype=d.get("dtype", "float32"),
                adapter_name=d.get("adapter_name", "default"),
                data=d.get("data") if version >= 2 else _v1_data(Path(adapter_dir)),
                init_iters=int(init.get("iters", 1)),
                svd_niter=init.get("svd_niter"),
                training=d.get("training"),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: missing or malformed field {e}") from e

    def write(self, adapter_dir: str | os.PathLike[str]) -> None:
        (Path(adapter_dir) / META_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _v1_data(adapter_dir: Path) -> dict[str, Any] | None:
    """Format 1 did not record the data settings: take them from the run's config.yaml beside it."""
    cfg = adapter_dir.parent / RUN_CONFIG_FILE
    if not cfg.is_file():
        return None
    import yaml

    try:
        data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    return {k: data[k] for k in DATA_KEYS if k in data} if isinstance(data, dict) else None


@dataclass
class AdapterDir:
    """An adapter dir, read and checked: metadata, PEFT config, tensors, initial factors."""

    dir: Path
    meta: AdapterMeta
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors as PEFT saved it
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (B, A)
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (B0, A0)
    # name -> the factors the frozen base's residual was taken with: ``initial``'s for olora and pissa,
    # loftq's previous round, None where the base is W itself (loftq at one round, plain LoRA)
    base: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    checkpoint: Path | None = None  # set by verify_base

    @property
    def meta_path(self) -> Path:
        return self.dir / META_FILE

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

    def verify_base(self, checkpoint: str | os.PathLike[str] | None = None, required: bool = False) -> Path | None:
        """The base checkpoint folder (``checkpoint`` if it moved), checked against the fingerprint.

        Raises:
            FileNotFoundError: the folder is gone, or ``required`` and none is recorded.
            ValueError: the folder's files differ from the ones the adapter was made on.
        """
        from . import quant

        folder = (
            Path(checkpoint) if checkpoint is not None else Path(self.meta.checkpoint) if self.meta.checkpoint else None
        )
        if folder is None:
            if required:
                raise FileNotFoundError(f"{self.meta_path} records no base checkpoint; pass checkpoint=")
            return None
        if not folder.is_dir():
            raise FileNotFoundError(f"base checkpoint {folder} recorded in {self.meta_path} was not found")
        if self.meta.fingerprint is not None:
            why = quant.fingerprint_mismatch(self.meta.fingerprint, folder)
            if why:
                raise ValueError(f"base checkpoint does not match {self.meta_path}: {why}")
        self.checkpoint = folder
        return folder

    def check_exportable(self) -> None:
        if self.config.get("modules_to_save"):
            raise ValueError(f"{self.dir / ADAPTER_CONFIG_FILE}: modules_to_save cannot be exported")


def read_adapter_dir(adapter_dir: str | os.PathLike[str]) -> AdapterDir:
    """Read and check an adapter dir; nothing is unpickled.

    Raises:
        FileNotFoundError: a missing dir or file (named).
        ValueError: a malformed file, naming it and the field or tensor.
    """
    adir = Path(adapter_dir)
    if not adir.is_dir():
        raise FileNotFoundError(f"adapter dir {adir} does not exist")
    for name in (ADAPTER_CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        if not (adir / name).is_file():
            raise FileNotFoundError(f"{adir / name} not found: {adir} is not a complete QOLoRA adapter dir")
    meta = AdapterMeta.read(adir)
    try:
        config = json.loads((adir / ADAPTER_CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{adir / ADAPTER_CONFIG_FILE}: not valid JSON ({e})") from e
    if config.get("use_dora") or config.get("lora_bias"):
        raise ValueError(f"{adir / ADAPTER_CONFIG_FILE}: DoRA and lora_bias adapters are not QOLoRA adapters")
    tensors = read_safetensors(adir / WEIGHTS_FILE)
    ad = AdapterDir(adir, meta, config, tensors)
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            mod = key.removesuffix(".lora_A.weight")
            if f"{mod}.lora_B.weight" not in tensors:
                raise ValueError(f"{adir / WEIGHTS_FILE}: {mod}.lora_B.weight is missing")
            ad.weights[mod.removeprefix(PEFT_PREFIX)] = (tensors[f"{mod}.lora_B.weight"], tensors[key])
    if meta.init not in INITS:
        raise ValueError(f"{ad.meta_path}: init method {meta.init!r} is not one of {', '.join(INITS)}")
    if meta.factored:
        _read_factors(ad)
    else:
        ad.base = dict.fromkeys(ad.weights)
    return ad


def _read_factors(ad: AdapterDir) -> None:
    path = ad.dir / FACTORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the {ad.meta.init} initial factors are needed to rebuild the base")
    flat = read_safetensors(path)
    names = {k.removesuffix(".B0") for k in flat if k.endswith(".B0")}
    try:
        ad.initial = {n: (flat[f"{n}.B0"], flat[f"{n}.A0"]) for n in names}
    except KeyError as e:
        raise ValueError(f"{path}: missing tensor {e}") from e
    missing = sorted(set(ad.weights) - names)
    if missing:
        raise ValueError(f"{path}: no initial factors for {len(missing)} adapter layers (first: {missing[0]})")
    if ad.meta.init != "loftq":
        ad.base = dict(ad.initial)
        return
    with_base = {n for n in names if f"{n}.{BASE_KEYS[0]}" in flat}
    if ad.meta.init_iters > 1 and with_base != names:
        first = sorted(names - with_base)[0]
        raise ValueError(
            f"{path}: loftq with {ad.meta.init_iters} rounds but no {first}.{BASE_KEYS[0]} (its base's factors)"
        )
    ad.base = {n: (flat[f"{n}.{BASE_KEYS[0]}"], flat[f"{n}.{BASE_KEYS[1]}"]) if n in with_base else None for n in names}


def write_adapter_dir(
    out: str | os.PathLike[str],
    save_peft: Callable[[Path], None],
    meta: AdapterMeta,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    base_factors: dict[str, tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> Path:
    """Write an adapter dir atomically: ``save_peft(tmp)`` writes PEFT's files, then the factors
    and ``qolora.json``. An interrupted write never leaves a dir that looks complete.

    Args:
        factors: per layer the initial (B0, A0).
        base_factors: per layer the factors the base's residual was taken with, where they are not
            ``factors`` (loftq); None entries (base = W) are recorded by their absence.
    """
    out = Path(out)
    # about what it takes: the factors, an adapter of the same size, 1 MiB of config and metadata
    pairs = [*factors.values(), *(p for p in (base_factors or {}).values() if p is not None)]
    need = 2 * sum(t.numel() * t.element_size() for pair in pairs for t in pair) + 2**20 if factors else None
    with atomic_dir(out, need_bytes=need) as tmp:
        save_peft(tmp)
        if factors:
            tensors: dict[str, torch.Tensor] = {}
            for name, (B0, A0) in factors.items():
                tensors[f"{name}.B0"] = B0.detach().cpu().contiguous()
                tensors[f"{name}.A0"] = A0.detach().cpu().contiguous()
            for name, pair in (base_factors or {}).items():
                if pair is not None:
                    tensors[f"{name}.{BASE_KEYS[0]}"] = pair[0].detach().cpu().contiguous()
                    tensors[f"{name}.{BASE_KEYS[1]}"] = pair[1].detach().cpu().contiguous()
            save_file(tensors, str(tmp / FACTORS_FILE), metadata={"format": "qolora-initial-factors"})
        meta.write(tmp)
    return out
