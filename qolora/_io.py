"""Files and process facts: atomic outputs (write a temporary sibling, rename it into place),
safetensors reads with one-line errors, peak RSS."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ExternalToolError(RuntimeError):
    """An outside tool QOLoRA runs (pip, llama.cpp's converter or quantizer) failed or is missing; one line."""


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary dir beside ``out``; on success it becomes ``out`` (replacing it if
    ``replace``), on any error or interrupt it is removed. A dir that looks complete is
    never left half-written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        old = None
        if out.exists():
            if not replace:
                raise FileExistsError(f"{out} already exists")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_safetensors(path: str | os.PathLike[str]) -> dict:
    """All tensors of a safetensors file (no pickle); a missing, empty or truncated file is one
    clear error naming it.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or not a complete safetensors file.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    if p.stat().st_size == 0:
        raise ValueError(f"{p} is empty: the save was interrupted; save again or restore the file")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a bad file
        raise ValueError(
            f"{p} is not a complete safetensors file ({str(e).splitlines()[0]}): the save was "
            "interrupted or the file is corrupt; save again or restore the file"
        ) from e


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path``; readers see the old file or the whole new one, never a part."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_figure_atomic(fig: Any, path: str | os.PathLike[str]) -> None:
    """Save and close a matplotlib figure; the PNG appears only once complete."""
    import matplotlib.pyplot as plt

    p = Path(path)
    fig.tight_layout()
    tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, p)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
