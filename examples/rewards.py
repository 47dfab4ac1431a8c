"""Reward functions for examples/grpo.yaml, with TRL's signature: ``f(prompts, completions, **columns)``
returns one float per completion. ``train.rewards: [rewards:short_answer]`` imports this file from
the config's folder."""

from __future__ import annotations

from typing import Any

TARGET_WORDS = 8


def _text(completion: Any) -> str:
    """A completion as text: a string, or chat turns when the prompts are conversations."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def short_answer(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """1.0 for an answer of TARGET_WORDS words, less the further it is from that (floored at -1)."""
    return [max(-1.0, 1 - abs(len(_text(c).split()) - TARGET_WORDS) / TARGET_WORDS) for c in completions]
