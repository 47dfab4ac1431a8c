"""GRPO's reward functions: ``train.rewards`` entries resolved to TRL-signature callables, and
checked on real rows before any model loads.

An entry is ``module:function`` (importable from the config file's folder or the Python path), or
a built-in by name:

- ``exact_match``: 1.0 when the completion, stripped, equals the row's ``answer`` (the reference
  completion of a prompt/completion, alpaca, chat or preference row), else 0.0;
- ``format:<regex>``: 1.0 when the regex matches the completion (``re.search``), else 0.0;
- ``length:<n>``: 1 - |words - n| / n, floored at -1: the closer to n words, the higher.

TRL calls each one as ``f(prompts=..., completions=..., **columns)`` and wants one float (or
None) per completion.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError

Reward = Callable[..., list[float | None]]


def _text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or turns for conversational prompts."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def exact_match(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1.0 when a completion, stripped, equals its row's answer."""
    return [float(_text(c).strip() == a.strip()) for c, a in zip(completions, answer, strict=True)]


def format_reward(pattern: str) -> Reward:
    rx = re.compile(pattern, re.S)

    def fmt(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return [float(rx.search(_text(c)) is not None) for c in completions]

    fmt.__name__ = "format"
    return fmt


def length_reward(n: int) -> Reward:
    def length(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return [max(-1.0, 1 - abs(len(_text(c).split()) - n) / n) for c in completions]

    length.__name__ = f"length_{n}"
    return length


def resolve(spec: str, config_dir: str | Path | None = None) -> Reward:
    """One ``train.rewards`` entry as a callable; one ConfigError line naming the entry otherwise."""
    where = f"train.rewards: {spec!r}"
    if spec == "exact_match":
        return exact_match
    if spec.startswith("format:"):
        try:
            return format_reward(spec.split(":", 1)[1])
        except re.error as e:
            raise ConfigError(f"{where}: not a regular expression ({e})") from None
    if spec.startswith("length:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"{where}: expected length:<words>, a positive integer")
        return length_reward(int(n))
    if ":" not in spec:
        raise ConfigError(f"{where}: expected module:function, or exact_match, format:<regex>, length:<n>")
    module, name = spec.split(":", 1)
    added = str(config_dir) if config_dir is not None and str(config_dir) not in sys.path else None
    if added:
        sys.path.insert(0, added)
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {module} ({e})") from None
    finally:
        if added:
            sys.path.remove(added)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {module} has no function {name}")
    return fn


def trl_extras(n: int) -> dict[str, Any]:
    """Stand-ins for the keyword arguments GRPOTrainer adds to every reward call besides the
    columns: a function without ``**kwargs`` must still accept them."""
    return {
        "completion_ids": [[0]] * n,
        "trainer_state": None,
        "log_extra": lambda *a, **k: None,
        "log_metric": lambda *a, **k: None,
    }


def check(fn: Reward, spec: str, rows: list[dict[str, Any]]) -> None:
    """Call ``fn`` as TRL will, on two real rows with stand-in completions: a wrong signature, an
    exception or a wrong number of values is one ConfigError line, before any model loads."""
    where = f"train.rewards: {spec!r}"
    n = len(rows)
    kwargs = {  # what TRL 1.16's GRPOTrainer passes: the rows' columns but the prompt, and its own four
        "prompts": [r["prompt"] for r in rows],
        "completions": ["a stand-in completion"] * n,
        **{k: [r[k] for r in rows] for k in rows[0] if k != "prompt"},
        **trl_extras(n),
    }
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: TRL calls it as f(prompts, completions, **columns): {e}") from None
    try:
        got = fn(**kwargs)
    except Exception as e:  # a user's function: any failure is reported as one line
        raise ConfigError(f"{where}: failed on {n} rows: {type(e).__name__}: {e}") from None
    if not isinstance(got, list) or len(got) != n:
        k = len(got) if isinstance(got, list) else type(got).__name__
        raise ConfigError(f"{where}: returned {k} values for {n} completions (a list of one float each)")
    bad = [v for v in got if v is not None and not isinstance(v, (int, float))]
    if bad:
        raise ConfigError(f"{where}: returned {bad[0]!r}, not a float or None")


def resolve_all(specs: list[str], config_dir: str | Path | None, rows: list[dict[str, Any]]) -> list[Reward]:
    """Every ``train.rewards`` entry resolved and checked on ``rows`` (at least 2); that there is one
    is the config's check."""
    out = []
    for spec in specs:
        fn = resolve(spec, config_dir)
        check(fn, spec, rows)
        out.append(fn)
    return out
