"""Training data through ``datasets``: read rows from local files or the HF cache, detect the format,
validate every row.

Sources: ``.json`` (a list of objects, or one key holding it), ``.jsonl``, ``.csv``, ``.parquet``,
``.arrow``, a folder saved with ``datasets.Dataset.save_to_disk``, or a hub dataset id already in
the local HF cache (no network). Files are read by ``datasets.load_dataset``, which converts them
to Arrow once (cached, memory-mapped), so a million rows never become Python objects. Formats
(``formats.py``, one object each):

- ``chat``: ``messages``: a list of ``{role, content}``
- ``sharegpt``: ``conversations``: a list of ``{from, value}``, from human / gpt / system
- ``alpaca``: ``instruction``, optional ``input``, ``output``
- ``prompt_completion``: ``prompt``, ``completion``
- ``text``: ``text``

A malformed row is an error naming the file, the 1-based row and the field, raised before
training starts; with ``skip_bad_rows`` such rows are dropped and counted instead. Validation is
a batched ``Dataset.map`` (cached like the conversion), not a Python loop over a list.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import FORMATS, get_format

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
ERROR = "_qolora_error"  # the validation map's per-row error column (null for a good row)


class DataError(ValueError):
    """A data problem; the message names the file, the row (1-based) and the field."""


@dataclass
class Rows:
    """Validated rows of one source, in one format, as a ``datasets.Dataset`` (a list is converted)."""

    path: str
    format: str
    rows: Any
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.rows, list):
            from datasets import Dataset

            self.rows = Dataset.from_list(self.rows)


def _python_rows(p: Path) -> list[Any]:
    """Rows read line by line in Python: only to name the bad row when ``datasets`` cannot build a table."""
    if p.suffix.lower() == ".jsonl":
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
    key, data = _json_rows(p)
    return data if key is None else data[key]


def _json_rows(p: Path) -> tuple[str | None, Any]:
    """A parsed .json file and the key holding its rows: None for a list, "train" for {"train": [...]}."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, list):
        return None, data
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        return next(iter(data)), data  # {"train": [...]} / {"data": [...]}
    raise DataError(f"{p}: expected a JSON list of rows")


def _json_field(p: Path) -> str | None:
    """The key of a ``{"train": [...]}`` .json file, else None (a list: datasets reads it as it is)."""
    with open(p, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return _json_rows(p)[0] if head.startswith("{") else None


def _load_file(p: Path) -> Any:
    from datasets import Features, Value, load_dataset

    builder = _BUILDERS[p.suffix.lower()]
    kw: dict[str, Any] = {}
    if builder == "csv":  # every cell a string, as written: no type guessing, no NaN for empty cells
        with open(p, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
        kw = {"features": Features({c: Value("string") for c in header}), "keep_default_na": False}
    elif p.suffix.lower() == ".json":
        key = _json_field(p)
        if key is not None:
            kw = {"field": key}
    return load_dataset(builder, data_files=str(p.resolve()), split="train", **kw)


def read_rows(path: str | os.PathLike[str]) -> Any:
    """The raw rows of a source as a ``datasets.Dataset``, in source order.

    A json/jsonl file ``datasets`` cannot turn into one table (broken JSON, a row that is not an
    object, a field whose type changes between rows) is re-read line by line: the error then
    names the row, or, when every row parses, the rows are returned as a list for ``load_rows``
    to validate one by one.
    """
    p = Path(path)
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
        return ds
    if not p.exists():
        return _from_hub_cache(str(path))
    suffix = p.suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(
            f"{p}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet, .arrow or a saved dataset dir"
        )
    try:
        return _load_file(p)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many types for one bad row
        if _BUILDERS[suffix] != "json":
            raise DataError(f"{p}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
        return _python_rows(p)


def _from_hub_cache(name: str) -> Any:
    """A hub dataset id, from the local HF cache only; a missing file otherwise."""
    looks_like_id = "/" in name and not name.startswith((".", "/")) and Path(name).suffix == ""
    if looks_like_id:
        import datasets.config
        import huggingface_hub.constants
        from datasets import load_dataset

        # both read HF_*_OFFLINE at import, so the environment is too late here: set their flags
        saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            return load_dataset(name, split="train")
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"{name}: no such data file, and not a dataset id in the local HF cache ({type(e).__name__})"
            ) from e
        finally:
            datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
    raise DataError(f"{name}: data file not found")


def detect_format(path: str, rows: Any) -> str:
    """The format, from a table's columns or from the first mapping row of a list."""
    if isinstance(rows, list):
        first = next(((i, r) for i, r in enumerate(rows[:50]) if isinstance(r, dict)), None)
        if first is None:
            raise DataError(f"{path}: no rows")
        i, keys = first[0], sorted(first[1])
    else:
        if len(rows) == 0:
            raise DataError(f"{path}: no rows")
        i, keys = 0, sorted(rows.column_names)
    for name, f in FORMATS.items():
        if all(k in keys for k in f.fields):
            return name
    raise DataError(
        f"{path} row {i + 1}: cannot detect the format from fields {keys}; "
        f"expected one of: {' | '.join(f.describe for f in FORMATS.values())}"
    )


def check_row(row: Any, fmt: str) -> dict[str, Any]:
    """Validate and normalize one row; raises KeyError / TypeError / ValueError naming the field."""
    if not isinstance(row, dict):
        raise TypeError(f"row must be an object, got {type(row).__name__}")
    return FORMATS[fmt].check(row)


def to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """A validated row of any format but text as chat turns."""
    messages = FORMATS[fmt].to_messages(row)
    if messages is None:
        raise ValueError(f"{fmt} rows have no chat turns")
    return messages


def batch_rows(batch: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A batched map's columns as one dict per row."""
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _as_chat_batch(batch: dict[str, list[Any]], fmt: str) -> dict[str, list[Any]]:
    return {"messages": [to_messages(row, fmt) for row in batch_rows(batch)]}


def load_sources(train: str | list[Any], fmt: str = "auto", skip_bad_rows: bool = False, seed: int = 0) -> Rows:
    """``load_rows`` for one source, or a list of them mixed in order.

    Each list entry is a path or ``{path, max_rows, fraction}``: ``fraction`` keeps that share of
    the source's rows (a seeded random subset, in file order), ``max_rows`` then caps them. Sources
    of different formats are turned into chat turns (``to_messages``); text rows cannot be.
    """
    if isinstance(train, str):
        return load_rows(train, fmt, skip_bad_rows)
    from datasets import concatenate_datasets

    parts = []
    for src in train:
        spec = {"path": src} if isinstance(src, str) else src
        got = load_rows(spec["path"], fmt, skip_bad_rows)
        ds = got.rows
        if spec.get("fraction") is not None and spec["fraction"] < 1:
            k = max(1, round(spec["fraction"] * len(ds)))
            ds = ds.select(sorted(random.Random(seed).sample(range(len(ds)), k)))
        if spec.get("max_rows"):
            ds = ds.select(range(min(len(ds), spec["max_rows"])))
        parts.append(Rows(got.path, got.format, ds, got.skipped))
        logger.info("%s: %d rows taken (%s)", got.path, len(ds), {k: v for k, v in spec.items() if k != "path"})
    formats = sorted({p.format for p in parts})
    out_fmt = formats[0]
    if len(formats) > 1:
        if "text" in formats:
            raise DataError(
                f"data.train: cannot mix text rows with {[f for f in formats if f != 'text']} rows (text has no "
                "turns to convert); use one format, or convert the text source"
            )
        out_fmt = "chat"
        parts = [
            p
            if p.format == "chat"
            else Rows(
                p.path,
                "chat",
                p.rows.map(
                    _as_chat_batch, batched=True, fn_kwargs={"fmt": p.format}, remove_columns=p.rows.column_names
                ),
                p.skipped,
            )
            for p in parts
        ]
    tables = [p.rows.cast(parts[0].rows.features) for p in parts]
    return Rows(
        " + ".join(p.path for p in parts), out_fmt, concatenate_datasets(tables), sum((p.skipped for p in parts), [])
    )


def _row_error(row: Any, fmt: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return check_row(row, fmt), None
    except KeyError as e:
        return None, f"field {e} is missing ({fmt} format)"
    except (TypeError, ValueError) as e:
        return None, str(e)


def _check_batch(batch: dict[str, list[Any]], fmt: str) -> dict[str, list[Any]]:
    """Validation as a batched map: normalized columns, and the error per row (None when good)."""
    empty = FORMATS[fmt].empty
    out: dict[str, list[Any]] = {k: [] for k in empty}
    out[ERROR] = []
    for row in batch_rows(batch):
        good, err = _row_error(row, fmt)
        for k, v in (good or empty).items():
            out[k].append(v)
        out[ERROR].append(err)
    return out


def _validate_table(p: str, ds: Any, fmt: str) -> tuple[Any, list[str]]:
    """Run ``_check_batch`` over a Dataset; the good rows and the error of each bad one (with its row)."""
    import numpy as np
    import pyarrow.compute as pc

    checked = ds.map(
        _check_batch,
        batched=True,
        batch_size=10_000,
        fn_kwargs={"fmt": fmt},
        remove_columns=ds.column_names,
        desc=f"checking {Path(p).name}",
    )
    errors = checked.data.column(ERROR)
    if errors.null_count == len(checked):
        return checked.remove_columns(ERROR), []
    bad = np.flatnonzero(pc.is_valid(errors).to_numpy(zero_copy_only=False))  # map output is in source order
    messages = [f"{p} row {i + 1}: {m}" for i, m in zip(bad, errors.drop_null().to_pylist(), strict=True)]
    keep = np.flatnonzero(pc.is_null(errors).to_numpy(zero_copy_only=False))
    return checked.select(keep).remove_columns(ERROR), messages


def load_rows(path: str | os.PathLike[str], fmt: str = "auto", skip_bad_rows: bool = False) -> Rows:
    """Read, detect and validate a whole source before any training starts.

    Raises:
        DataError: the first bad row, e.g. ``train.jsonl row 17: field 'output' is missing``.
    """
    raw = read_rows(path)
    p = str(path)
    if fmt == "auto":
        fmt = detect_format(p, raw)
    else:
        try:
            get_format(fmt)
        except ValueError as e:
            raise DataError(str(e)) from None
    if isinstance(raw, list):  # a json file datasets could not make one table of: row by row
        rows: Any = []  # Rows makes a Dataset of it
        skipped = []
        for i, row in enumerate(raw, 1):
            ok, err = _row_error(row, fmt)
            if ok is not None:
                rows.append(ok)
            else:
                skipped.append(f"{p} row {i}: {err}")
    else:
        rows, skipped = _validate_table(p, raw, fmt)
    if skipped and not skip_bad_rows:
        raise DataError(skipped[0] + "; fix it or set data.skip_bad_rows=true")
    if skipped:
        logger.warning("%s: skipped %d bad rows (first: %s)", p, len(skipped), skipped[0])
    if len(rows) == 0:
        raise DataError(f"{p}: no valid rows")
    logger.info("%s: %d rows, format %s", p, len(rows), fmt)
    return Rows(p, fmt, rows, skipped)
