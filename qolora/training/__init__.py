"""Data formats → tokenized examples; trainer setup; run outputs; the ``train`` pipeline."""

from .data import DataError, load_rows
from .run import train
from .tokenize import Collator, Encoder

__all__ = ["Collator", "DataError", "Encoder", "load_rows", "train"]
