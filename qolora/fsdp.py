"""FSDP-QLoRA (``train.distributed: fsdp``): rank 0's one base, sharded over every rank as it arrives.

Rank 0 loads the 4-bit base on the CPU and runs the one init; every other rank builds the same model
on the meta device and reads no weight file. ``load_sharded_`` then takes the model one decoder
layer at a time: rank 0 broadcasts the layer's bytes (its parameters, buffers and every 4-bit
weight's whole quant_state, which no parameter broadcast would carry), every rank rebuilds it on
its own device bit for bit, digests it, and FSDP2's ``fully_shard`` cuts it to 1/N before the next
layer comes. So no rank's device ever holds more than one layer whole beside its shards, and the
checkpoint is read once, by rank 0 (docs/design.md, invariants 18 and 18c).

Checkpoints under FSDP hold torch's full (world-size independent) state dicts of the adapter and
its optimizer, gathered to rank 0 (``full_trainable_state``, ``full_optimizer_state``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import quant
from .distributed import DistributedError, World, broadcast_object, compare_digests, device, layer_digests
from .quant import set_weight_, weight_parts

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder layer: the classes the model's ``_no_split_modules`` names,
    which accelerate's transformer wrap policy shards one by one too."""
    names = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedError(
            f"train.distributed=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) "
            "to shard; use ddp"
        )
    return layers


@dataclass
class Sharded:
    """What ``load_sharded_`` did on this rank (``metrics.json``: ``fsdp_load``, one per rank)."""

    digests: list[str]
    kernel: Any = None
    memory: dict[str, int] = field(default_factory=dict)


def _groups(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The units sent and sharded one at a time: each decoder layer's modules, then all the others (the root)."""
    layers = decoder_layers(model)
    prefixes = tuple(n + "." for n, _ in layers)
    out = [(n, [(f"{n}.{k}" if k else n, m) for k, m in layer.named_modules()]) for n, layer in layers]
    inside = {n for n, _ in layers}
    rest = [(n, m) for n, m in model.named_modules() if n not in inside and not n.startswith(prefixes)]
    return out + [("", rest)]


def _entries(modules: list[tuple[str, nn.Module]], sent: set[int]) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Rank 0: what a group holds, as (descriptions, tensors in send order). A tensor that two names
    share (tied embeddings) is sent once, under all its names."""
    by_id: dict[int, dict[str, Any]] = {}
    entries, tensors = [], []
    for mname, m in modules:
        items = [("param", k, t) for k, t in m._parameters.items() if t is not None]
        items += [("buffer", k, t) for k, t in m._buffers.items() if t is not None]
        for kind, key, t in items:
            name = f"{mname}.{key}" if mname else key
            if id(t) in by_id:
                by_id[id(t)]["names"].append(name)
                continue
            if id(t) in sent:
                raise DistributedError(f"train.distributed=fsdp: {name} is shared with another decoder layer")
            sent.add(id(t))
            e: dict[str, Any] = {"kind": kind, "names": [name], "requires_grad": bool(t.requires_grad)}
            if kind == "param" and key == "weight" and quant.is_4bit(m):
                e["kind"], (e["info"], parts) = "4bit", weight_parts(m)
            else:
                parts = [("tensor", t)]
            e["parts"] = [(p, tuple(x.shape), x.dtype) for p, x in parts]
            tensors += [x for _, x in parts]
            by_id[id(t)] = e
            entries.append(e)
    return entries, tensors


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _broadcast_bytes(tensors: list[torch.Tensor] | None, total: int, dev: torch.device, w: World) -> torch.Tensor:
    """One collective per group: rank 0's tensors as one flat uint8 buffer, on every rank's device.
    Bytes, not values, travel: a NaN bit pattern in float-typed packed 4-bit data arrives as it left."""
    if w.is_main:
        flat = torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors]).to(dev)
    else:
        flat = torch.empty(total, dtype=torch.uint8, device=dev)
    if w.size > 1:
        torch.distributed.broadcast(flat, src=0)
    return flat


def _install_(model: nn.Module, entries: list[dict[str, Any]], flat: torch.Tensor) -> None:
    """Every rank: the group's tensors, cut from ``flat`` (each copied out, so no shard keeps the
    whole buffer alive), put in place of the meta (or CPU) ones."""
    offset = 0
    for e in entries:
        parts = {}
        for p, shape, dtype in e["parts"]:
            n = _nbytes(shape, dtype)
            parts[p] = flat[offset : offset + n].clone().view(dtype).reshape(shape)
            offset += n
        if e["kind"] == "param":  # one Parameter for all its names: tied weights stay tied
            param = nn.Parameter(parts["tensor"], requires_grad=e["requires_grad"])
        for name in e["names"]:
            mname, _, key = name.rpartition(".")
            try:
                m = model.get_submodule(mname)
            except AttributeError:
                raise DistributedError(f"train.distributed=fsdp: rank 0 has {name}, this rank has not") from None
            if e["kind"] == "4bit":
                set_weight_(m, e["info"], parts)
            elif e["kind"] == "param":
                m._parameters[key] = param
            else:
                m._buffers[key] = parts["tensor"]


def _held_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of this rank's parameters and buffers, a DTensor's local shard only, nothing for meta;
    the same whole)."""
    from torch.distributed.tensor import DTensor

    seen, held, whole = set(), 0, 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        local = t.to_local() if isinstance(t, DTensor) else t
        held += local.numel() * local.element_size()
        whole += t.numel() * t.element_size()
    return held, whole


def load_sharded_(model: nn.Module, w: World, kernel_check: bool = True) -> Sharded:
    """Give every rank rank 0's model, one FSDP2-sharded layer at a time, in place (see the module doc).

    Args:
        model: on rank 0 the initialized model (any device); elsewhere the same model on meta.
        kernel_check: check the first 4-bit layer's kernel on each rank's device before it is sharded.

    Returns:
        This rank's digests of every rank's model, its kernel check and its parameter bytes.

    Raises:
        DistributedError: a layer that arrived different on some rank, or a tensor rank 0 did not
            send (named, on every rank, before step 1); a tensor this rank's model lacks.
    """
    from torch.distributed.fsdp import fully_shard

    from .quant import check_layer

    dev, sent, digests = device(w), set(), {}
    result = Sharded([])
    peak = 0
    groups = _groups(model)
    for name, modules in groups:
        entries, tensors = _entries(modules, sent) if w.is_main else (None, None)
        entries = broadcast_object(entries, w)
        total = sum(_nbytes(s, d) for e in entries for _, s, d in e["parts"])
        _install_(model, entries, _broadcast_bytes(tensors, total, dev, w))
        del tensors
        digests.update(layer_digests(model, modules=modules))
        peak = max(peak, _held_bytes(model)[0])
        first4 = next(((n, m) for n, m in modules if quant.is_4bit(m)), None)
        if kernel_check and result.kernel is None and first4:  # on this rank's device, before it is sharded
            result.kernel = check_layer(first4[0].removesuffix(".base_layer"), first4[1])
            logger.info("%s", result.kernel)
        fully_shard(modules[0][1] if name else model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:  # compared below, so that every rank stops in the same line
        digests[f"{left[0]} (rank 0 sent no such tensor: {len(left)} left on meta)"] = "missing"
    model._is_accelerate_prepared = True  # accelerate's own mark: sharded already, no DDP wrap on top
    held, whole = _held_bytes(model)
    result.memory = {"peak_param_bytes": peak, "param_bytes": held, "model_param_bytes": whole}
    result.digests = compare_digests(digests, w)
    n = len(groups) - 1
    logger.info("FSDP2: rank 0's model sent to %d ranks and sharded, one of its %d decoder layers at a time", w.size, n)
    return result


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _options(**kw: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable state (the adapter) as plain CPU tensors on rank 0, gathered from the
    FSDP shards (a collective: every rank calls it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(ignore_frozen_params=True))


def load_full_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Put a whole trainable state (every rank passes the same one, read from ``source``) into the FSDP shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise DistributedError(f"{source} lacks {len(missing)} adapter tensors, the first {sorted(missing)[0]}")
    set_model_state_dict(model, state, options=_options(strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state for the whole adapter, keyed by parameter name, on rank 0 (a collective):
    independent of the world size, so a checkpoint resumes on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())
