"""Rows → token ids and labels, with loss only on completion / assistant tokens by default.

Every format becomes a list of (text, trainable) segments; each segment is tokenized on its
own and labels are -100 on the segments that are not trained on.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import DataError, Rows
from .losses import IGNORE

logger = logging.getLogger(__name__)

Segments = list[tuple[str, bool]]


def alpaca_prompt(instruction: str, inp: str) -> str:
    """The Alpaca prompt (Taori et al., 2023) without its preamble."""
    text = f"### Instruction:\n{instruction}\n\n"
    if inp.strip():
        text += f"### Input:\n{inp}\n\n"
    return text + "### Response:\n"


def _as_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "chat":
        return row["messages"]
    if fmt == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> Segments:
    """Split a chat rendered by the tokenizer's template into prompt and assistant spans.

    Raises:
        DataError: when the template is not prefix-consistent (rendering a conversation's
        first turns does not give a prefix of rendering all of it).
    """
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    segs: Segments = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
            raise DataError(
                "the tokenizer's chat template is not prefix-consistent, so assistant tokens cannot be "
                "located; set data.template=plain or data.completion_only=false"
            )
        segs += [(full[pos : len(prefix)], False), (full[len(prefix) : len(upto)], True)]
        pos = len(upto)
    segs.append((full[pos:], False))
    return [s for s in segs if s[0]]


def plain_segments(row: dict[str, Any], fmt: str) -> Segments:
    if fmt == "text":
        return [(row["text"], True)]
    if fmt == "alpaca":
        return [(alpaca_prompt(row["instruction"], row["input"]), False), (row["output"], True)]
    if fmt == "prompt_completion":
        return [(row["prompt"], False), (row["completion"], True)]
    return [(f"{m['role']}: {m['content']}\n", m["role"] == "assistant") for m in row["messages"]]


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def __str__(self) -> str:
        return (
            f"{self.rows} examples, {self.tokens} tokens ({self.target_tokens} trained on); "
            f"{self.truncated} truncated to max_length; {self.no_target} dropped with no target token left"
        )


@dataclass
class Encoder:
    """Turns validated rows into ``{"input_ids", "labels"}`` examples."""

    tokenizer: Any
    max_length: int = 512
    template: str = "auto"
    completion_only: bool = True
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __post_init__(self) -> None:
        if self.template == "auto":
            self.template = "chat" if getattr(self.tokenizer, "chat_template", None) else "plain"
        if self.template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise DataError("data.template=chat but the tokenizer has no chat template; use plain")

    def segments(self, row: dict[str, Any], fmt: str) -> tuple[Segments, bool]:
        """Segments and whether they are a complete chat-template rendering."""
        if fmt != "text" and self.template == "chat":
            return chat_segments(_as_messages(row, fmt), self.tokenizer), True
        return plain_segments(row, fmt), False

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, list[int]] | None:
        tok = self.tokenizer
        segs, templated = self.segments(row, fmt)
        ids: list[int] = []
        labels: list[int] = []
        if not templated and tok.bos_token_id is not None and _adds_bos(tok):
            ids, labels = [tok.bos_token_id], [IGNORE]
        for text, trainable in segs:
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if (trainable or not self.completion_only) else [IGNORE] * len(piece)
        if not templated and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
            labels.append(tok.eos_token_id)
        if len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            self.stats.truncated += 1
        n_target = sum(x != IGNORE for x in labels)
        if n_target == 0:
            self.stats.no_target += 1
            return None
        self.stats.rows += 1
        self.stats.tokens += len(ids)
        self.stats.target_tokens += n_target
        return {"input_ids": ids, "labels": labels}

    def encode_rows(self, rows: Rows) -> list[dict[str, list[int]]]:
        out = []
        for i, row in enumerate(rows.rows, 1):
            try:
                ex = self.encode(row, rows.format)
            except DataError as e:
                raise DataError(f"{rows.path} row {i}: {e}") from e
            if ex is not None:
                out.append(ex)
        logger.info("%s: %s", rows.path, self.stats)
        if not out:
            raise DataError(f"{rows.path}: no example has a target token left after truncation to {self.max_length}")
        return out


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Padding-free packing: whole examples, in order, into packs of at most ``max_length`` tokens.

    Each pack carries ``position_ids`` that restart at 0 for every example, which is what keeps
    attention inside an example: with position_ids and no attention mask, transformers builds a
    block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), as for
    ``DataCollatorWithFlattening``. The first label of every example is ignored, so no token is
    trained to predict the start of the next example. Examples are never split (they are already
    truncated to ``max_length``), so the loss over a pack is the token-weighted loss of its
    examples run one by one (docs/design.md, invariant 16).
    """
    packs: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            packs.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += [IGNORE, *ex["labels"][1:]]
        cur["position_ids"] += range(n)
    if cur["input_ids"]:
        packs.append(cur)
    return [p for p in packs if any(x != IGNORE for x in p["labels"])]


def split_rows(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Hold out ``fraction`` of the rows (at least one) as an eval split, reproducibly."""
    if len(rows.rows) < 2:
        raise DataError(f"{rows.path}: need at least 2 rows to hold out an eval split; give data.eval")
    idx = list(range(len(rows.rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(fraction * len(idx)))
    held = set(idx[:n_eval])
    train = [r for i, r in enumerate(rows.rows) if i not in held]
    evals = [r for i, r in enumerate(rows.rows) if i in held]
    return Rows(rows.path, rows.format, train), Rows(f"{rows.path} (eval split)", rows.format, evals)


@dataclass
class Collator:
    """Pad a batch to its longest example: pad id for inputs, -100 for labels.

    Packs (items with ``position_ids``, from ``pack``) are not padded: the batch becomes one row,
    the packs end to end, with their position_ids and no attention mask, as transformers'
    ``DataCollatorWithFlattening`` lays a batch out.
    """

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if "position_ids" in batch[0]:
            return {
                k: torch.tensor([[t for x in batch for t in x[k]]]) for k in ("input_ids", "labels", "position_ids")
            }
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            k = len(x["input_ids"])
            ids[i, :k] = torch.tensor(x["input_ids"])
            labels[i, :k] = torch.tensor(x["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
