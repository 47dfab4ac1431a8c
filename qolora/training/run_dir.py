"""The training output dir (the run folder): its file names, one run at a time (a lock), checkpoints
that are complete only once sealed, which checkpoint a resume takes, and whether a resume matches
the run (docs/design.md, "Files on disk"). Nothing else types these names.

A checkpoint is written by transformers' Trainer file by file. QOLoRA then writes
``qolora-seal.json`` into it: every file's size and sha256. A checkpoint without a seal (a crash
or a full disk while saving) or whose files no longer match it (truncated later) is not complete:
``--resume`` moves it aside as ``checkpoint-N.incomplete`` with a warning and takes the one before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._io import sha256_file, write_json_atomic
from ..files import FINAL_ADAPTER, LOCK_FILE, META_FILE, METRICS_FILE, RUN_CONFIG_FILE

logger = logging.getLogger(__name__)
SEAL_FILE = "qolora-seal.json"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, in every checkpoint


def saved_callback_state(ckpt: Path, name: str) -> dict:
    """The attributes an ``ExportableState`` callback ``name`` saved in ``ckpt``'s trainer state ({} if none)."""
    try:
        saved = json.loads((ckpt / TRAINER_STATE).read_text()).get("stateful_callbacks", {})
    except (OSError, ValueError):
        return {}
    return (saved.get(name) or {}).get("attributes", {})


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


def is_finished(out: Path) -> bool:
    """The run wrote its final adapter (its qolora.json is written last, atomically)."""
    return (out / FINAL_ADAPTER / META_FILE).is_file()


def read_metrics(out: Path) -> dict:
    """The run's ``metrics.json`` ({} if there is none yet or it cannot be read)."""
    try:
        return json.loads((out / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def check_resume(cfg: Any, out: Path) -> None:
    """Refuse a --resume whose model, quant or adapter settings differ from the run's own."""
    import yaml

    from ..config import ConfigError, changed_on_resume

    saved_path = out / RUN_CONFIG_FILE
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved_path}: not valid YAML ({e})") from e
    changed = changed_on_resume(saved, cfg)
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} changed since the run in {out} started; restore them, "
            "or start a new run in another train.output_dir"
        )


def check_world_size(out: Path, size: int) -> None:
    """A --resume runs at the world size its checkpoints were written at (their data order and RNG)."""
    from ..config import ConfigError

    before = read_metrics(out).get("world_size", 1)
    if before != size:
        raise ConfigError(
            f"--resume: the run in {out} ran on {before} process(es), this launch has {size}; relaunch with "
            f"{before} (torchrun --nproc_per_node / accelerate launch --num_processes), or start a new train.output_dir"
        )


class RunLockedError(OSError):
    """Another live process trains in this output dir (exit 2 from the CLI)."""


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.qolora-run.lock`` for the body: a second run in ``out`` is refused in one line naming
    the running one; a lock left by a killed run is taken over with a warning.

    Note:
        The lock is a ``flock`` on the file, which the kernel releases when its process dies, so a
        killed run (kill -9, OOM) never leaves a stale lock behind; the pid and host written into
        the file only say who holds it.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_holder(path))
            raise RunLockedError(
                f"train.output_dir: {out} is in use by another qolora train ({holder}); wait for it to end, "
                "or choose another train.output_dir"
            ) from None
        old = _holder(path)
        if old.get("pid") and not old.get("ended"):  # its holder died without releasing it cleanly
            logger.warning("%s: taking over the lock of a run that was killed (%s)", out, _describe(old))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps({**me, "ended": True}) + "\n").encode(), 0)
    finally:
        os.close(fd)  # releases the flock
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:  # a run that wrote nothing leaves nothing
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(N, checkpoint-N)`` in ``out``, sealed or not, by N."""
    found = [(int(m.group(1)), d) for d in out.glob("checkpoint-*") if (m := CHECKPOINT_RE.fullmatch(d.name))]
    return sorted(found)


def seal(ckpt: Path) -> int:
    """Write ``ckpt``'s seal (every file's size and sha256), last and atomically; its total bytes."""
    files = {str(p.relative_to(ckpt)): p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != SEAL_FILE}
    entries = {k: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for k, p in files.items()}
    write_json_atomic(ckpt / SEAL_FILE, {"files": entries})
    return sum(e["bytes"] for e in entries.values())


def seal_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` is not complete (no seal, a file missing, another size or content), or None."""
    try:
        files = json.loads((ckpt / SEAL_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no {SEAL_FILE} (its save did not finish)"
    if TRAINER_STATE not in files:
        return f"its seal lists no {TRAINER_STATE}"
    for name, e in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != e["bytes"]:
            return f"{name} is {p.stat().st_size} bytes, its seal says {e['bytes']}"
        if sha256_file(p) != e["sha256"]:
            return f"{name} does not match its sha256 in the seal"
    return None


def sealed_bytes(ckpt: Path) -> int:
    """The bytes a sealed checkpoint holds (0 if unsealed)."""
    try:
        return sum(e["bytes"] for e in json.loads((ckpt / SEAL_FILE).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def latest_complete_checkpoint(out: Path, set_aside: bool = True) -> Path | None:
    """The newest checkpoint whose seal holds. Newer ones that fail are named in a warning and, if
    ``set_aside``, renamed ``checkpoint-N.incomplete`` (the resumed run writes a fresh checkpoint-N)."""
    for _, d in reversed(checkpoints(out)):
        problem = seal_problem(d)
        if problem is None:
            return d
        aside = _free_name(d, "incomplete")
        logger.warning("skipping %s: %s; %s", d, problem, f"moved to {aside.name}" if set_aside else "not complete")
        if set_aside:
            d.rename(aside)
    return None


def _free_name(d: Path, why: str) -> Path:
    aside, k = d.with_name(f"{d.name}.{why}"), 1
    while aside.exists():
        aside, k = d.with_name(f"{d.name}.{why}{k}"), k + 1
    return aside


def set_aside(ckpt: Path, why: str) -> Path:
    """Rename ``ckpt`` to ``checkpoint-N.<why>`` (kept for a look, never resumed from); the new path."""
    aside = _free_name(ckpt, why)
    ckpt.rename(aside)
    return aside


def set_aside_names(out: Path, why: str) -> list[str]:
    """The names of the checkpoints set aside as ``why``."""
    return sorted(d.name for d in out.glob(f"checkpoint-*.{why}*"))


def rotate(out: Path, keep: int) -> None:
    """Delete the oldest sealed checkpoints beyond the newest ``keep``; unsealed ones are left alone."""
    sealed = [d for _, d in checkpoints(out) if (d / SEAL_FILE).is_file()]
    for d in sealed[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
