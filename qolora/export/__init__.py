"""Exports: a streaming merged 16-bit model, and a portable rank-2r LoRA for the original base."""

from .lora import export_lora
from .merged import ExportResult, export_merged

__all__ = ["ExportResult", "export_lora", "export_merged"]
