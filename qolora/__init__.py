"""QOLoRA: exact, fast OLoRA adapters on a 4-bit NF4 base, as standard PEFT models."""

from .adapters import QoloraState, get_qolora_model, load_adapter, save_adapter
from .export import export_lora, export_merged
from .olora import olora_factors
from .precision import resolve_compute_dtype
from .quant import load_quantized
from .report import InitReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "InitReport",
    "LayerReport",
    "QoloraState",
    "__version__",
    "export_lora",
    "export_merged",
    "get_qolora_model",
    "load_adapter",
    "load_quantized",
    "olora_factors",
    "resolve_compute_dtype",
    "save_adapter",
]
