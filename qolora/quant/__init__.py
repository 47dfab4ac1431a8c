"""Everything that touches bitsandbytes: NF4 (de/re)quantization, 4-bit loading, weight sources."""

from .loading import bnb_config, load_quantized
from .nf4 import (
    QuantSettings,
    dequantize,
    is_4bit,
    linear4bit,
    quant_settings,
    quantize,
    quantize_linear,
    requantize_,
    roundtrip,
)
from .source import CheckpointWeights, find_checkpoint, fingerprint, fingerprint_mismatch

__all__ = [
    "CheckpointWeights",
    "QuantSettings",
    "bnb_config",
    "dequantize",
    "find_checkpoint",
    "fingerprint",
    "fingerprint_mismatch",
    "is_4bit",
    "linear4bit",
    "load_quantized",
    "quant_settings",
    "quantize",
    "quantize_linear",
    "requantize_",
    "roundtrip",
]
