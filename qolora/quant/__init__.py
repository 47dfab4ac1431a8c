"""Everything that touches bitsandbytes: NF4 (de/re)quantization, 4-bit loading, weight sources."""

from .check import KernelCheck, KernelCheckError, check_kernel, check_layer
from .layout import check_supported, cpu_packing_available, keep_standard_layout_
from .loading import bnb_config, full_precision_linears, held_bytes, load_base, load_quantized, meta_model
from .nf4 import (
    QuantSettings,
    dequantize,
    is_4bit,
    is_8bit,
    is_repacked,
    linear4bit,
    quant_settings,
    quantize,
    quantize_linear,
    requantize_,
    roundtrip,
    state_tensors,
    weight_parts,
)
from .source import CheckpointWeights, find_checkpoint, fingerprint, fingerprint_mismatch, resolve_model
from .transfer import make_4bit_twin_, set_weight_, twin_spec

__all__ = [
    "CheckpointWeights",
    "KernelCheck",
    "KernelCheckError",
    "check_kernel",
    "check_layer",
    "check_supported",
    "cpu_packing_available",
    "is_8bit",
    "is_repacked",
    "keep_standard_layout_",
    "resolve_model",
    "QuantSettings",
    "bnb_config",
    "dequantize",
    "find_checkpoint",
    "fingerprint",
    "fingerprint_mismatch",
    "full_precision_linears",
    "held_bytes",
    "is_4bit",
    "linear4bit",
    "make_4bit_twin_",
    "set_weight_",
    "twin_spec",
    "weight_parts",
    "load_base",
    "load_quantized",
    "meta_model",
    "quant_settings",
    "quantize",
    "quantize_linear",
    "requantize_",
    "roundtrip",
    "state_tensors",
]
