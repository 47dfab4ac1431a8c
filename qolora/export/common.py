"""What both exports need: the adapter dir read back (``adapter_dir.read_adapter_dir``) and its
base checkpoint verified."""

from __future__ import annotations

import os

from ..adapter_dir import AdapterDir, read_adapter_dir


def read_adapter(adapter_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> AdapterDir:
    """Read an adapter dir for export; ``.checkpoint`` is the verified base checkpoint folder.

    Raises:
        FileNotFoundError: a missing adapter dir, file or base checkpoint (named).
        ValueError: a changed base checkpoint, or an adapter QOLoRA cannot export.
    """
    ad = read_adapter_dir(adapter_dir)
    ad.check_exportable()
    ad.verify_base(checkpoint, required=True)
    return ad
