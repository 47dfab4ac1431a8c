"""Rows → token ids and labels, with loss only on completion / assistant tokens by default.

Every format becomes a list of (text, trainable) segments; each segment is tokenized on its
own and labels are -100 on the segments that are not trained on.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import DataError, Rows, batch_rows, to_messages
from .formats import FORMATS, Messages, Segments
from .losses import IGNORE

logger = logging.getLogger(__name__)


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
            return chat_segments(to_messages(row, fmt), self.tokenizer), True
        return FORMATS[fmt].plain_segments(row), False

    def prompt_ids(self, messages: Messages, fmt: str) -> list[int]:
        """The ids training puts before the first trained token of a ``fmt`` row holding ``messages``
        (the conversation so far) and an empty reply: what generation continues from. Training and
        generate render through this one path (docs/design.md, "train and serve render alike").

        A text row is trained from its first token, so its prompt is the whole text, continued.
        """
        tok = self.tokenizer
        segs, templated = self.segments(FORMATS[fmt].prompt_row(messages), fmt)
        if fmt != "text":
            segs = segs[: next((i for i, (_, trained) in enumerate(segs) if trained), len(segs))]
        ids = [tok.bos_token_id] if not templated and tok.bos_token_id is not None and _adds_bos(tok) else []
        for text, _ in segs:
            ids += tok(text, add_special_tokens=False)["input_ids"]
        return ids

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

    def fingerprint(self, rows: Rows) -> str:
        """What the tokenized rows depend on: the data, the tokenizer, the data settings, this encoder."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        parts = [
            ENCODE_VERSION,
            getattr(rows.rows, "_fingerprint", ""),
            rows.format,
            vocab,
            json.dumps(tok.special_tokens_map, sort_keys=True, default=str),
            str(getattr(tok, "chat_template", None)),
            type(tok).__name__,
            str(_adds_bos(tok)),
            f"{self.max_length}/{self.template}/{self.completion_only}",
        ]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]

    def encode_rows(self, rows: Rows) -> Any:
        """Examples for every row, as a batched map over the Dataset.

        For a file-backed Dataset the result is an Arrow file beside the source's own cache, named
        by ``fingerprint``: a second run or a ``--resume`` reads it (memory-mapped) instead of
        tokenizing again.
        """
        import numpy as np
        import pyarrow.compute as pc

        ds = rows.rows
        fp = self.fingerprint(rows)
        cache = None
        if ds.cache_files:
            cache = str(Path(ds.cache_files[0]["filename"]).parent / f"qolora-tokens-{fp}.arrow")
        nproc = min(os.cpu_count() or 1, 8) if len(ds) >= 50_000 else None
        if cache and (os.path.exists(cache) or glob.glob(cache[: -len(".arrow")] + "_*_of_*.arrow")):
            logger.info("%s: tokenized cache used (%s): no tokenization", rows.path, cache)
        elif cache:
            logger.info("%s: tokenizing %d rows (cached at %s)", rows.path, len(ds), cache)
        out = ds.map(
            _encode_batch,
            batched=True,
            batch_size=1000,
            with_indices=True,
            fn_kwargs={
                "encoder": dataclasses.replace(self, stats=EncodeStats()),
                "fmt": rows.format,
                "path": rows.path,
            },
            remove_columns=ds.column_names,
            new_fingerprint=fp,
            cache_file_name=cache,
            num_proc=nproc,
            desc=f"tokenizing {Path(rows.path).name}",
        )
        n_target = out.data.column("_n_target")
        keep = pc.greater(n_target, 0)
        st = self.stats
        st.rows += int(pc.sum(keep).as_py() or 0)
        st.no_target += len(out) - int(pc.sum(keep).as_py() or 0)
        st.truncated += int(pc.sum(out.data.column("_truncated")).as_py() or 0)
        st.tokens += int(pc.sum(out.data.column("length")).as_py() or 0)
        st.target_tokens += int(pc.sum(n_target).as_py() or 0)
        logger.info("%s: %s", rows.path, st)
        if st.rows == 0:
            raise DataError(f"{rows.path}: no example has a target token left after truncation to {self.max_length}")
        if st.no_target:
            out = out.select(np.flatnonzero(keep.to_numpy(zero_copy_only=False)))
        return out.remove_columns(["_n_target", "_truncated"])


# bump when encode() changes what it produces, to retire old caches; 2: a plain chat turn's
# "assistant: " label is not trained
ENCODE_VERSION = "qolora-encode-2"


def _encode_batch(batch: dict[str, list[Any]], idx: list[int], encoder: Encoder, fmt: str, path: str) -> dict:
    """``Encoder.encode`` over a batch of rows, with the per-row counts the stats are summed from."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "_n_target": [], "_truncated": []}
    for i, row in zip(idx, batch_rows(batch), strict=True):
        before = encoder.stats.truncated
        try:
            ex = encoder.encode(row, fmt)
        except DataError as e:
            raise DataError(f"{path} row {i + 1}: {e}") from e
        truncated = encoder.stats.truncated > before
        ex = ex or {"input_ids": [], "labels": []}
        out["input_ids"].append(ex["input_ids"])
        out["labels"].append(ex["labels"])
        out["length"].append(len(ex["input_ids"]))
        out["_n_target"].append(sum(x != IGNORE for x in ex["labels"]))
        out["_truncated"].append(truncated)
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


def _pack_batch(batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
    packs = pack(batch_rows(batch), max_length)
    return {k: [p[k] for p in packs] for k in ("input_ids", "labels", "position_ids")}


def pack_examples(examples: Any, max_length: int) -> Any:
    """``pack`` for a list, or as a batched map over a Dataset (packs do not span its 10,000-example batches)."""
    if isinstance(examples, list):
        return pack(examples, max_length)
    return examples.map(
        _pack_batch,
        batched=True,
        batch_size=10_000,
        fn_kwargs={"max_length": max_length},
        remove_columns=examples.column_names,
        desc="packing",
    )


def take(examples: Any, start: int = 0, stop: int | None = None) -> list[dict[str, list[int]]]:
    """Examples ``start:stop`` as a list of dicts, from a list or a Dataset (whose slices are columns)."""
    stop = len(examples) if stop is None else min(stop, len(examples))
    if isinstance(examples, list):
        return examples[start:stop]
    return batch_rows(examples[start:stop])


def head(rows: Rows, n: int | None) -> Rows:
    """The first ``n`` rows (all when ``n`` is None)."""
    if not n or n >= len(rows.rows):
        return rows
    return Rows(rows.path, rows.format, rows.rows.select(range(n)), rows.skipped)


def split_rows(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Hold out ``fraction`` of the rows (at least one) as an eval split, reproducibly."""
    if len(rows.rows) < 2:
        raise DataError(f"{rows.path}: need at least 2 rows to hold out an eval split; give data.eval")
    idx = list(range(len(rows.rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(fraction * len(idx)))
    held = set(idx[:n_eval])
    train = rows.rows.select([i for i in range(len(idx)) if i not in held])
    evals = rows.rows.select(sorted(held))
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
