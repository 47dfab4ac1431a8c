"""Training data: read rows from local files, detect the format, validate every row.

Sources: ``.json`` (a list of objects), ``.jsonl``, ``.csv``, ``.parquet``, or a folder saved
with ``datasets.Dataset.save_to_disk``. Formats:

- ``alpaca``: ``instruction``, optional ``input``, ``output``
- ``chat``: ``messages``: a list of ``{role, content}``
- ``prompt_completion``: ``prompt``, ``completion``
- ``text``: ``text``

A malformed row is an error naming the file, the 1-based row and the field, raised before
training starts; with ``skip_bad_rows`` such rows are dropped and counted instead.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A data problem; the message names the file, the row (1-based) and the field."""


@dataclass
class Rows:
    """Validated rows of one file, in one format."""

    path: str
    format: str
    rows: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)


def read_rows(path: str | os.PathLike[str]) -> list[Any]:
    """Raw rows of a data file, in file order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if p.is_dir():
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(p))
        except Exception as e:  # datasets raises several types for a non-dataset folder
            raise DataError(f"{p}: not a dataset saved with datasets.save_to_disk ({e})") from e
        if hasattr(ds, "keys"):  # a DatasetDict
            if "train" not in ds:
                raise DataError(f"{p}: DatasetDict without a 'train' split (has {list(ds.keys())})")
            ds = ds["train"]
        return list(ds)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p} row {i}: not valid JSON ({e.msg} at column {e.colno})") from e
        return rows
    if suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of rows")
        return data
    if suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    raise DataError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet or a saved dataset dir")


def detect_format(path: str, rows: list[Any]) -> str:
    """The format of the first row that is a mapping with a known field set."""
    for row in rows[:50]:
        if isinstance(row, dict):
            for fmt, keys in FORMATS.items():
                if all(k in row for k in keys):
                    return fmt
            raise DataError(
                f"{path} row {rows.index(row) + 1}: cannot detect the format from fields {sorted(row)}; "
                f"expected one of: messages | instruction+output | prompt+completion | text"
            )
    raise DataError(f"{path}: no rows")


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise KeyError(key)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def check_row(row: Any, fmt: str) -> dict[str, Any]:
    """Validate and normalize one row; raises KeyError / TypeError / ValueError naming the field."""
    if not isinstance(row, dict):
        raise TypeError(f"row must be an object, got {type(row).__name__}")
    if fmt == "chat":
        msgs = row.get("messages")
        if msgs is None:
            raise KeyError("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("field 'messages' must be a non-empty list")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise TypeError(f"field 'messages[{j}]' must be an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"field 'messages[{j}].role' must be one of {list(ROLES)}, got {role!r}")
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"field 'messages[{j}].content' must be a non-empty string")
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in out):
            raise ValueError("field 'messages' has no assistant turn to learn from")
        return {"messages": out}
    if fmt == "alpaca":
        r = {
            "instruction": _text(row, "instruction"),
            "input": _text(row, "input", False),
            "output": _text(row, "output"),
        }
        empty = "instruction" if not r["instruction"].strip() else "output" if not r["output"].strip() else None
    elif fmt == "prompt_completion":
        r = {"prompt": _text(row, "prompt"), "completion": _text(row, "completion")}
        empty = "prompt" if not r["prompt"].strip() else "completion" if not r["completion"].strip() else None
    else:
        r = {"text": _text(row, "text")}
        empty = "text" if not r["text"].strip() else None
    if empty:
        raise ValueError(f"field '{empty}' is empty")
    return r


def load_rows(path: str | os.PathLike[str], fmt: str = "auto", skip_bad_rows: bool = False) -> Rows:
    """Read, detect and validate a whole file before any training starts.

    Raises:
        DataError: the first bad row, e.g. ``train.jsonl row 17: field 'output' is missing``.
    """
    raw = read_rows(path)
    p = str(path)
    if fmt == "auto":
        fmt = detect_format(p, raw)
    elif fmt not in FORMATS:
        raise DataError(f"data.format: unknown format {fmt!r}; use auto, {', '.join(FORMATS)}")
    good, skipped = [], []
    for i, row in enumerate(raw, 1):
        try:
            good.append(check_row(row, fmt))
        except KeyError as e:
            msg = f"{p} row {i}: field {e} is missing ({fmt} format)"
        except (TypeError, ValueError) as e:
            msg = f"{p} row {i}: {e}"
        else:
            continue
        if not skip_bad_rows:
            raise DataError(msg + "; fix it or set data.skip_bad_rows=true")
        skipped.append(msg)
    if skipped:
        logger.warning("%s: skipped %d bad rows (first: %s)", p, len(skipped), skipped[0])
    if not good:
        raise DataError(f"{p}: no valid rows")
    logger.info("%s: %d rows, format %s", p, len(good), fmt)
    return Rows(p, fmt, good, skipped)
