"""Streaming merged export: a plain 16-bit HF model folder that any tool loads.

``trained`` writes dequant(NF4(W_res)) + s·B·A, the model that was trained and evaluated;
``original`` writes W + s·(B·A − B0·A0) from the original checkpoint, without the base's
quantization error. Tensors are read one at a time and written shard by shard, so peak
memory is about one output shard plus one layer, whatever the model's size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import quant
from .._io import atomic_dir, peak_rss_bytes
from ..adapter_dir import AdapterDir
from ..olora import subtract_lowrank_
from ..precision import dtype_name, parse_dtype
from .common import read_adapter

logger = logging.getLogger(__name__)

MODES = ("trained", "original")
_PREFIXES = ("model", "transformer")
_SKIP_FILES = {"config.json", "README.md", "model.safetensors.index.json", ".gitattributes"}
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass
class ExportResult:
    out_dir: Path
    seconds: float
    bytes_written: int
    peak_rss_bytes: int
    tensors: int
    merged_layers: int
    gap: float | None = None  # export_lora(measure_gap=True): mean relative weight gap to the trained model

    def __str__(self) -> str:
        text = (
            f"wrote {self.out_dir}: {self.tensors} tensors ({self.merged_layers} adapter layers), "
            f"{self.bytes_written / 2**20:.1f} MiB in {self.seconds:.1f} s, "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )
        if self.gap is not None:
            text += (
                f"\ngap to the trained model: mean relative weight difference {self.gap:.5f} (the residual's NF4 "
                "error, which the portable adapter on the original base does not have)"
            )
        return text


class ShardWriter:
    """Accumulate tensors and write ``model-0000i-of-0000N.safetensors`` shards plus the index."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder, self.max = folder, max_shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + n > self.max:
            self.flush()
        self.buf[key] = t.contiguous()
        self.buf_bytes += n
        self.total += n

    def flush(self) -> None:
        name = f"shard-{len(self.shards) + 1:05d}.tmp"
        save_file(self.buf, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def finish(self) -> None:
        if self.buf or not self.shards:
            self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp_name).rename(self.folder / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def merged_weight(parts: AdapterDir, name: str, W: torch.Tensor, mode: str, device: str) -> torch.Tensor:
    """One target layer's merged (out, in) float32 weight from its original W (out, in)."""
    meta = parts.meta
    B, A = (t.to(device) for t in parts.weights[name])
    s = parts.scale(name)
    factored = meta.factored
    B0, A0 = (t.to(device) for t in parts.initial[name]) if factored else (None, None)
    base = parts.base.get(name)
    if mode == "trained" and meta.quant is not None:
        settings = quant.QuantSettings.from_dict(meta.quant)
        if factored:
            if meta.layer_sources.get(name) == "dequantized":
                W = quant.roundtrip(W, settings)  # the 4-bit weight the init factored
            if base is not None:  # the residual exactly as init/reload built it (loftq: its own factors)
                subtract_lowrank_(W, base[0].to(device), base[1].to(device), s)
        W = quant.roundtrip(W, settings)  # what the trained model's base held
    else:
        if factored:
            subtract_lowrank_(W, B0, A0, s)
        if mode == "trained":  # an unquantized base kept the residual in its own dtype
            W = W.to(parse_dtype(meta.dtype)).to(torch.float32)
    return W.addmm_(B.to(torch.float32), A.to(torch.float32), alpha=s)


def _as_stored(ckpt: quant.CheckpointWeights, key: str, W: torch.Tensor) -> torch.Tensor:
    """A per-expert view's tensor back in its stored orientation."""
    return W.T if ckpt.views[key].transposed else W


def _quant_device(parts: AdapterDir) -> str:
    recorded = (parts.meta.quant or {}).get("device", "cpu")
    if recorded == "cuda" and not torch.cuda.is_available():
        logger.warning("the base was quantized on CUDA; re-quantizing on the CPU may differ in the last bit")
    return "cuda" if recorded == "cuda" and torch.cuda.is_available() else "cpu"


def export_merged(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "trained",
    dtype: str = "float16",
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ExportResult:
    """Write a merged 16-bit HF model folder from an adapter dir and its base checkpoint.

    Args:
        mode: "trained" (dequant(NF4(W_res)) + s·B·A) or "original" (W + s·(B·A − B0·A0)).
        dtype: "float16" or "bfloat16" (or "float32").
        overwrite: replace an existing ``out_dir``.
        max_shard_bytes: output shard size; peak memory is about this plus one layer.

    Raises:
        FileNotFoundError / FileExistsError / ValueError: with the path or field at fault.
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    out_dtype = parse_dtype(dtype, "dtype")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    parts = read_adapter(adapter_dir, checkpoint)
    ckpt = quant.CheckpointWeights(parts.checkpoint)
    targets = {ckpt.find(n, _PREFIXES): n for n in parts.weights}
    if None in targets:
        raise ValueError(f"{parts.checkpoint} lacks a weight for some adapter layers")
    quantized = {ckpt.find(n, _PREFIXES) for n in parts.meta.quantized_modules} - {None}
    device = _quant_device(parts)
    settings = quant.QuantSettings.from_dict(parts.meta.quant) if parts.meta.quant else None
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)

        def merged(key: str) -> torch.Tensor:
            exact = key in targets or (mode == "trained" and key in quantized and settings is not None)
            W = ckpt.get(key, device=device, dtype=torch.float32 if exact else None)  # copies: no fp32 detour
            if key in targets:
                name = targets[key]
                flip = name in parts.meta.transposed
                W = merged_weight(parts, name, W.T.contiguous() if flip else W, mode, device)
                W = W.T if flip else W
            elif mode == "trained" and key in quantized and settings is not None:
                W = quant.roundtrip(W, settings)
            return W.to(device="cpu", dtype=out_dtype)

        for key in tqdm(ckpt.keys(), desc=f"export {mode}", unit="tensor", disable=not progress):
            experts = ckpt.experts_of(key)
            if experts:  # fused as the checkpoint stores them, from each expert's merged matrices
                writer.add(key, torch.stack([torch.cat([_as_stored(ckpt, k, merged(k)) for k in e]) for e in experts]))
            else:
                writer.add(key, merged(key))
        writer.finish()
        _write_side_files(parts, tmp, out_dtype, mode)
    result = ExportResult(out, time.perf_counter() - t0, writer.total, peak_rss_bytes(), len(ckpt.keys()), len(targets))
    logger.info("%s", result)
    return result


def _write_side_files(parts: AdapterDir, tmp: Path, out_dtype: torch.dtype, mode: str) -> None:
    """config.json without quantization_config, tokenizer and generation files, a model card."""
    config = json.loads((parts.checkpoint / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = dtype_name(out_dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in parts.checkpoint.iterdir():
        if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(f, tmp / f.name)
    tok_cfg = tmp / "tokenizer_config.json"
    if tok_cfg.is_file() and (tmp / "tokenizer.json").is_file():
        tok_cfg.write_text(json.dumps(portable_tokenizer_config(json.loads(tok_cfg.read_text())), indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(parts, mode, out_dtype))


# Tokenizer classes transformers 5 writes that transformers 4.x cannot resolve: 4.x looks the name up
# among its own classes and fails with "Tokenizer class TokenizersBackend does not exist". Both lines
# accept PreTrainedTokenizerFast (in 5.x it is the same class as TokenizersBackend), and it reads the
# same tokenizer.json, so the tokens are identical.
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend"}
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def portable_tokenizer_config(cfg: dict) -> dict:
    """``tokenizer_config.json`` that transformers 4.x (and llama.cpp's converter, vLLM, TGI on it) loads too."""
    if cfg.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES:
        cfg = {**cfg, "tokenizer_class": PORTABLE_TOKENIZER_CLASS}
    return cfg


def _sources(train: object) -> str:
    if not train:
        return "not recorded"
    items = train if isinstance(train, list) else [train]
    return ", ".join(str(x["path"] if isinstance(x, dict) else x) for x in items)


_METHODS = {  # init -> (name, paper) for the model card
    "olora": ("OLoRA", "arXiv 2406.01775"),
    "pissa": ("PiSSA", "arXiv 2404.02948"),
    "loftq": ("LoftQ", "arXiv 2310.08659"),
    "lora": ("LoRA", "arXiv 2106.09685"),
}


def model_card(parts: AdapterDir, mode: str, out_dtype: torch.dtype) -> str:
    c, meta = parts.config, parts.meta
    base = meta.base_model or str(parts.checkpoint)
    how = (
        "dequant(NF4(W_res)) + s·B·A: exactly the 4-bit model that was trained"
        if mode == "trained"
        else "W + s·(B·A − B0·A0) on the original weights: no base quantization error"
    )
    method, paper = _METHODS.get(meta.init, _METHODS["lora"])
    if meta.init_iters > 1:
        method += f", {meta.init_iters} rounds"
    on = "4-bit " + meta.quant["quant_type"].upper() if meta.quant else "full-precision"
    # base_model in the front matter is read as a hub id (by the Hub, and by llama.cpp's converter
    # for general.base_model.*); a local folder is named in the text only.
    local = Path(base).is_absolute() or Path(base).is_dir() or base.startswith((".", "~"))
    front = "" if local else f"base_model: {base}\n"
    return f"""---
{front}library_name: transformers
tags: [qolora, {meta.init}, lora, merged]
---
# Merged QOLoRA fine-tune of {Path(base).name}

- Base model: `{base}`
- Method: {method} adapters ({paper}) on a {on} base, trained with QOLoRA
- Rank {c["r"]}, alpha {c["lora_alpha"]}, target modules {c.get("target_modules")}
- Training data: {_sources((meta.data or {}).get("train"))}
- Merge mode `{mode}`: {how}
- Weights: {dtype_name(out_dtype)} safetensors; loads with `AutoModelForCausalLM.from_pretrained`
"""
