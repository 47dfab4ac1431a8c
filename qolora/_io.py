"""Atomic outputs: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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
