"""Data formats → tokenized examples; trainer setup; run outputs; the ``train`` pipeline.

Names are imported on first use, so that ``qolora.training.formats`` (which the config reads) can
be imported without the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"DataError": "data", "load_rows": "data", "train": "run", "Collator": "tokenize", "Encoder": "tokenize"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
