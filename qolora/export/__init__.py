"""Exports: a streaming merged 16-bit model, a portable rank-2r LoRA for the original base, and GGUF."""

from .gguf import GGUFResult, export_gguf
from .lora import export_lora
from .merged import ExportResult, export_merged

__all__ = ["ExportResult", "GGUFResult", "export_gguf", "export_lora", "export_merged"]
