"""Files and process facts: atomic outputs (write a temporary sibling, rename it into place), a full
disk as one line, safetensors reads with one-line errors, peak RSS."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ExternalToolError(RuntimeError):
    """An outside tool QOLoRA runs (pip, llama.cpp's converter or quantizer) failed or is missing; one line."""


class RunStopped(Exception):
    """A signal stopped a run (after its checkpoint was written); ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DiskFullError(OSError):
    """A write failed because its filesystem is full: one line saying what, where and how much (exit 2)."""


DISK_FULL_MARKS = ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded")


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def is_disk_full(e: BaseException, path: Path, need_bytes: int | None = None) -> bool:
    """``e`` (or what caused it) is ENOSPC, or says so, or the filesystem has less room than the write needs.

    Note:
        torch.save reports a full disk as ``RuntimeError: ... unexpected pos`` with no errno, so the
        free space is measured too: a write that fails with less room left than it needs is a full disk.
    """
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(seen) for m in DISK_FULL_MARKS):
            return True
        seen = seen.__cause__ or seen.__context__
    return need_bytes is not None and _free_bytes(path) < need_bytes


@contextlib.contextmanager
def disk_full_as_one_line(what: str, path: str | os.PathLike[str], need_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing ``what`` to ``path`` into one ``DiskFullError`` line: what, where,
    how much it needs (when known) and how much is free. Other errors pass unchanged."""
    path = Path(path)
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e, path, need_bytes):
            raise
        need = f"it needs about {_mb(need_bytes)}, " if need_bytes else ""
        err = DiskFullError(
            f"no space left on the device writing {what} to {path}: {need}{_mb(_free_bytes(path))} free; "
            "free some space, then run again (a training run: with --resume)"
        )
        err.errno = errno.ENOSPC
        raise err from e


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike[str], replace: bool = True, what: str | None = None, need_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary dir beside ``out``; on success it becomes ``out`` (replacing it if
    ``replace``), on any error or interrupt it is removed. A dir that looks complete is
    never left half-written. A full disk is one ``DiskFullError`` line naming ``what`` (default:
    the dir's name) and ``need_bytes`` when given.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with disk_full_as_one_line(what or out.name, out, need_bytes):
            try:
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # before the free space is measured
                raise
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


def sha256_file(path: str | os.PathLike[str], on_chunk: Any = None, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's bytes, read ``chunk`` bytes at a time; ``on_chunk(n)`` after each."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_chunk is not None:
                on_chunk(len(block))
    return h.hexdigest()


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
        with disk_full_as_one_line(p.name, p, len(text.encode())):
            try:
                tmp.write_text(text)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
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
