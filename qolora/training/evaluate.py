"""``qolora eval``: loss and perplexity of the base and the fine-tuned model; learn and forget.

learn = base loss − fine-tuned loss on the target data; forget = fine-tuned loss − base loss
on source-domain data ("LoRA Learns Less and Forgets Less", Biderman et al., arXiv 2405.09673).
The base is the model the adapter was made on, loaded as at init (the 4-bit QLoRA base).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter_dir import DATA_KEYS, read_adapter_dir
from ..adapters import load_adapter, load_recorded_base
from ..config import DataConfig
from .data import load_rows
from .losses import CE_CHUNK, token_loss_sum, verified_ce_chunk
from .tokenize import Collator, Encoder, head, take


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: int
    examples: int


@torch.no_grad()
def completion_loss(
    model: nn.Module, examples: Any, pad_id: int, batch_size: int = 8, desc: str = "eval"
) -> LossResult:
    """Token-weighted mean cross-entropy over the target (label != -100) tokens."""
    model.eval()
    collate = Collator(pad_id)
    device = next(model.parameters()).device
    total, count, chunk = 0.0, 0, None
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
        batch = {k: v.to(device) for k, v in collate(take(examples, i, i + batch_size)).items()}
        if i == 0:  # the chunked CE only where it matched the model's own loss
            chunk, _ = verified_ce_chunk(model, batch, CE_CHUNK)
        ce, n = token_loss_sum(model, batch, chunk)
        total += float(ce)
        count += int(n)
    loss = total / max(count, 1)
    return LossResult(loss, math.exp(min(loss, 50.0)), count, len(examples))


def evaluate(
    adapter_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    source_data: str | os.PathLike[str] | None = None,
    *,
    batch_size: int = 8,
    max_rows: int | None = None,
    models: tuple[str, ...] = ("base", "tuned"),
) -> dict[str, Any]:
    """Base and fine-tuned loss on ``data`` (and ``source_data``), with learn and forget.

    ``models=("tuned",)`` skips the base (for many adapters of one base: measure it once).
    """
    from .run import load_tokenizer

    ad = read_adapter_dir(adapter_dir)
    adir, meta = ad.dir, ad.meta
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name in DATA_KEYS}
    settings = {**defaults, **(meta.data or {})}  # an adapter not made by qolora train: the defaults
    tokenizer = load_tokenizer(meta.checkpoint or meta.base_model)
    sets = {"target": data, **({"source": source_data} if source_data else {})}
    examples = {}
    for name, path in sets.items():
        rows = load_rows(path)
        rows = head(rows, max_rows)
        examples[name] = Encoder(
            tokenizer, settings["max_length"], settings["template"], settings["completion_only"]
        ).encode_rows(rows)
    pad = tokenizer.pad_token_id
    base = load_recorded_base(meta, ad.meta_path)
    result: dict[str, Any] = {"adapter": str(adir), "data": {k: str(v) for k, v in sets.items()}}
    for name, ex in examples.items():
        if "base" in models:
            result[f"base_{name}"] = asdict(completion_loss(base, ex, pad, batch_size, f"base {name}"))
    if "tuned" not in models:
        return result
    tuned = load_adapter(adir, base, progress=False)  # turns the base into the residual in place
    for name, ex in examples.items():
        result[f"tuned_{name}"] = asdict(completion_loss(tuned, ex, pad, batch_size, f"fine-tuned {name}"))
    if "base" not in models:
        return result
    result["learn"] = result["base_target"]["loss"] - result["tuned_target"]["loss"]
    if source_data:
        result["forget"] = result["tuned_source"]["loss"] - result["base_source"]["loss"]
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'set':<8} {'model':<11} {'loss':>8} {'ppl':>10} {'tokens':>8}"]
    for name in ("target", "source"):
        for who in ("base", "tuned"):
            r = result.get(f"{who}_{name}")
            if r:
                label = "fine-tuned" if who == "tuned" else "base"
                lines.append(f"{name:<8} {label:<11} {r['loss']:>8.4f} {r['perplexity']:>10.2f} {r['tokens']:>8}")
    lines.append(f"learn  (base - fine-tuned, target): {result['learn']:+.4f}")
    if "forget" in result:
        lines.append(f"forget (fine-tuned - base, source): {result['forget']:+.4f}")
    return "\n".join(lines)
