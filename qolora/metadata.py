"""``qolora.json``: what an adapter dir needs beyond PEFT's files to rebuild its exact base."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "qolora-adapter"
FORMAT_VERSION = 1
META_FILE = "qolora.json"
FACTORS_FILE = "initial_factors.safetensors"

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
        init: "olora" or "lora".
        init_source: the requested source ("auto", "checkpoint", "dequantized").
        layer_sources: per target layer, where W came from ("checkpoint", "dequantized", "module").
        base_model: the base model's ``name_or_path`` as loaded.
        checkpoint: absolute folder of the base's safetensors, if there was one.
        fingerprint: ``qolora.quant.fingerprint`` of that folder.
        quant: the 4-bit settings (``QuantSettings.to_dict`` plus compute_dtype), None unquantized.
        dtype: dtype of the base's unquantized parameters.
        quantized_modules: names of the base's 4-bit linear layers (targets or not).
        transposed: target layers whose checkpoint tensor is stored (in, out), as Conv1D's is.
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
                "init_source": self.init_source,
                "layer_sources": self.layer_sources,
                "transposed": self.transposed,
            },
            "versions": library_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def read(cls, adapter_dir: str | os.PathLike[str]) -> "AdapterMeta":
        """Parse ``adapter_dir/qolora.json``; errors name the file and the field."""
        path = Path(adapter_dir) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {adapter_dir} is not a QOLoRA adapter dir")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: field 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {d.get('format_version')!r} is not supported "
                f"(this QOLoRA reads {FORMAT_VERSION})"
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
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: missing or malformed field {e}") from e

    def write(self, adapter_dir: str | os.PathLike[str]) -> None:
        (Path(adapter_dir) / META_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
