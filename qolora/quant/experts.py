"""Mixture-of-experts layers in 4-bit: fused experts loaded as one linear layer per expert matrix,
in the checkpoint's own layout, so transformers' bitsandbytes conversion makes each one NF4.

transformers 5 keeps a MoE layer's experts fused, as 3-D parameters (``gate_up_proj``: experts x
2·intermediate x hidden, ``down_proj``: experts x hidden x intermediate), which bitsandbytes does
not quantize: about 95% of a MoE model's parameters would stay in 16 bits. Mixtral and Qwen-MoE
checkpoints store the experts one matrix each (``experts.E.w1`` / ``w3`` / ``w2``, or
``experts.E.gate_proj`` / ``up_proj`` / ``down_proj``), and transformers fuses them while loading
(its conversion mapping). ``unfused_experts_loading`` keeps them as they are stored instead:

- before any weight is read, each fused experts module of the meta model is replaced by
  ``UnfusedExperts``, one ``nn.Linear`` per stored matrix, named as in the checkpoint; the
  bitsandbytes conversion then makes each a ``Linear4bit`` like any other linear layer (the same
  blocksize, double quantization and storage);
- the fusing converters are left out of the conversion mapping (renamings such as Mixtral's
  ``block_sparse_moe`` -> ``mlp`` stay), so each stored matrix loads into its own layer, one at a
  time, and is quantized as it arrives: no 16-bit copy of the experts is ever held.

gpt-oss checkpoints store their experts fused, as its model holds them: ``experts.gate_up_proj``
(experts x hidden x 2·intermediate, the gate and up columns interleaved), ``experts.down_proj``
(experts x intermediate x hidden), each with a bias, and a clamped SwiGLU between them. Those
load as one biased ``nn.Linear`` per expert matrix too (``InterleavedExpert``): converters added to
the conversion mapping (``SplitExperts``) cut each fused tensor into its experts, transposed to
(out, in), as it is read, and each is quantized as it arrives. ``CheckpointWeights`` shows the same
per-expert views of the stored tensors (``expert_views``) to the factored inits, and the merged
export writes the experts fused again, as the checkpoint stores them. A Mixtral or Qwen-MoE saved by
transformers 5 (fused: each expert's gate rows, then its up rows) loads the same way, its matrices
named as the original checkpoints name them.

The forward is transformers' own loop over the experts a batch hits, each expert's matrices
running as 4-bit matmuls: one expert's weights are dequantized at a time. Every step of QOLoRA
that works on linear layers (the factored inits from the checkpoint, reload, digests, the merged
export, which streams the checkpoint's keys) then works on the experts unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

FUSED = ("gate_up_proj", "down_proj")
FUSED_TARGETS = tuple(f"experts.{n}" for n in FUSED)  # what transformers' converters fuse expert matrices into


class Expert(nn.Module):
    """One expert: three linear layers named as the checkpoint names them."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, **like: Any) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=False, **like))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=False, **like))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=False, **like))

    def forward(self, x: torch.Tensor, act_fn: Any) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(act_fn(gate(x)) * up(x))


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation (``GptOssExperts._apply_gate``): gate and up interleaved in one output,
    both clamped, ``(up + 1) · gate · sigmoid(alpha · gate)``."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class InterleavedExpert(nn.Module):
    """One gpt-oss expert: ``gate_up_proj`` (hidden -> 2·intermediate, gate and up interleaved) and
    ``down_proj``, both biased, named as the checkpoint's fused tensors."""

    names = ("gate_up_proj", "down_proj")

    def __init__(self, hidden: int, intermediate: int, **like: Any) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=True, **like)
        self.down_proj = nn.Linear(intermediate, hidden, bias=True, **like)

    def forward(self, x: torch.Tensor, act_fn: Any) -> torch.Tensor:
        return self.down_proj(act_fn(self.gate_up_proj(x)))


class UnfusedExperts(nn.ModuleList):
    """A fused experts module as one expert module per expert: ``Expert`` (Mixtral's, Qwen-MoE's,
    named by ``names``) or, for gpt-oss's biased, clamped experts, ``InterleavedExpert``. The same
    forward as transformers': each expert a batch hits, on its tokens, weighted by the router."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str] | None = None) -> None:
        w = fused.gate_up_proj
        like = {"device": w.device, "dtype": w.dtype}  # the meta model's: nothing is allocated
        if is_interleaved_experts(fused):
            num, hidden, two_i = w.shape  # stored (in, out)
            experts: list[nn.Module] = [InterleavedExpert(hidden, two_i // 2, **like) for _ in range(num)]
            act: Any = functools.partial(clamped_swiglu, alpha=float(fused.alpha), limit=float(fused.limit))
        else:
            if names is None:
                raise ValueError(f"{type(fused).__name__}: the checkpoint's names of its expert matrices are unknown")
            num, two_i, hidden = w.shape
            experts = [Expert(names, hidden, two_i // 2, **like) for _ in range(num)]
            act = fused.act_fn
        super().__init__(experts)
        self.num_experts = num
        self.__dict__["act_fn"] = act  # no parameters; not a child, so the list holds experts only

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = set(torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist())
        missed = [e for e in range(self.num_experts) if e not in hit]
        if missed and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # run the experts no token reaches on none, so their adapters still get a (zero) gradient
            # on every rank, as a fused expert's slice does: FSDP's gradient reduce-scatter needs the
            # same parameters with gradients on every rank
            final = final + sum(self[e](hidden_states[:0], self.act_fn).sum() for e in missed) * 0
        for e in sorted(hit):
            if e == self.num_experts:
                continue
            pos, tokens = torch.where(mask[e])
            out = self[e](hidden_states[tokens], self.act_fn) * top_k_weights[tokens, pos, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final


def _fused_params(m: nn.Module) -> dict[str, torch.Tensor]:
    """``m``'s own 3-D parameters named as transformers names fused experts."""
    return {n: p for n, p in m.named_parameters(recurse=False) if n in FUSED and p.ndim == 3}


def is_fused_experts(m: nn.Module) -> bool:
    """A transformers fused experts module of the gated (act(gate) * up, then down) kind."""
    return (
        len(_fused_params(m)) == len(FUSED)
        and hasattr(m, "act_fn")
        and not any(n.endswith("_bias") for n, _ in m.named_parameters(recurse=False))  # gpt-oss's: biased, clamped
    )


INTERLEAVED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def is_interleaved_experts(m: nn.Module) -> bool:
    """gpt-oss's fused experts: biased, (in, out) per expert, gate and up interleaved, clamped SwiGLU."""
    own = dict(m.named_parameters(recurse=False))
    return (
        all(n in own for n in INTERLEAVED)
        and own["gate_up_proj"].ndim == 3
        and hasattr(m, "alpha")
        and hasattr(m, "limit")
    )


def has_unfused_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds experts loaded one matrix each (``UnfusedExperts``)."""
    return any(isinstance(m, UnfusedExperts) for m in model.modules())


def _names(patterns: list[str]) -> list[str]:
    """``.experts.*.w1.weight`` -> ``w1``."""
    out = []
    for p in patterns:
        m = re.search(r"experts\.\*\.(\w+)\.weight$", p)
        if not m:
            return []
        out.append(m.group(1))
    return out


def stored_names(model: nn.Module) -> tuple[str, str, str] | None:
    """(gate, up, down) as ``model``'s type's checkpoints name one expert's matrices (``names_for_type``)."""
    return names_for_type(getattr(getattr(model, "config", None), "model_type", None))


def names_for_type(model_type: str | None) -> tuple[str, str, str] | None:
    """(gate, up, down) as the model type's checkpoints name one expert's matrices, read from
    transformers' conversion mapping (the converters that fuse them); None if it fuses none."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    gate_up = down = None
    for t in (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []:
        targets = getattr(t, "target_patterns", [])
        names = _names(list(getattr(t, "_original_source_patterns", t.source_patterns)))
        if any(str(x).endswith(FUSED_TARGETS[0]) for x in targets) and len(names) == 2:
            gate_up = names
        elif any(str(x).endswith(FUSED_TARGETS[1]) for x in targets) and len(names) == 1:
            down = names
    return (gate_up[0], gate_up[1], down[0]) if gate_up and down else None


def unfuse_(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by ``UnfusedExperts``, in place (gated ones
    when the checkpoint's names of their matrices are known, ``stored_names``; gpt-oss's always);
    their names. Once any is, PEFT's rewrite of expert names is kept off those models
    (``keep_peft_from_refusing_experts``)."""
    names = stored_names(model)
    done = []
    for name, m in list(model.named_modules()):
        if (names is not None and is_fused_experts(m)) or is_interleaved_experts(m):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, UnfusedExperts(m, names))
            done.append(name)
    if done:
        keep_peft_from_refusing_experts()
    return done


def fused_parts(names: tuple[str, ...]) -> dict[str, list[str]]:
    """{fused parameter (as stock transformers holds it): the expert's layers it stacks, in row order},
    for an expert whose layers are ``names`` (``Expert.names`` or ``InterleavedExpert.names``): a
    gated expert's gate and up share ``gate_up_proj``; gpt-oss's two layers are the fused parameters."""
    if len(names) == 2:
        return {n: [n] for n in names}
    gate, up, down = names
    return {"gate_up_proj": [gate, up], "down_proj": [down]}


def _is_fusing(t: Any) -> bool:
    return any(str(x).endswith(FUSED_TARGETS) for x in getattr(t, "target_patterns", []))


PER_MATRIX = re.compile(r"\.experts\.\d+\.\w+\.weight$")
STORED_FUSED = re.compile(r"^(?P<experts>.*\.experts)\.(?P<name>gate_up_proj|down_proj)(?P<bias>_bias)?$")


class View(NamedTuple):
    """One expert matrix (or bias) inside a fused stored tensor: ``stored[expert]``, transposed to
    (out, in) when the store is (in, out), and row block ``part`` of ``parts`` (gate, up)."""

    stored: str
    expert: int
    transposed: bool
    part: int = 0
    parts: int = 1


def stores_experts_per_matrix(path: str | os.PathLike[str]) -> bool:
    """Whether the checkpoint in ``path`` holds MoE experts that load one 4-bit layer per matrix:
    stored one matrix each (``...experts.3.w1.weight``), or fused in 16 bits in a layout QOLoRA
    cuts (``expert_views``: gpt-oss's; Mixtral's and Qwen-MoE's as transformers 5 saves them). False
    for a dense model, a checkpoint without safetensors, or fused experts of an unknown layout."""
    from .source import CheckpointWeights

    try:
        ckpt = CheckpointWeights(path)
    except FileNotFoundError:
        return False
    return any(PER_MATRIX.search(k) for k in ckpt.keys()) or bool(ckpt.views)


def fused_stores(keys: list[str]) -> dict[str, str]:
    """{``...experts`` prefix: "interleaved" (gpt-oss: gate_up_proj, down_proj and their biases) or
    "gated" (gate_up_proj and down_proj, no biases)} for the fused experts stored in ``keys``."""
    found: dict[str, set[str]] = {}
    for k in keys:
        m = STORED_FUSED.match(k)
        if m:
            found.setdefault(m["experts"], set()).add(m["name"] + (m["bias"] or ""))
    kinds = {frozenset(INTERLEAVED): "interleaved", frozenset(FUSED): "gated"}
    return {p: kinds[frozenset(n)] for p, n in sorted(found.items()) if frozenset(n) in kinds}


def expert_views(keys: list[str], shape: Any, names: tuple[str, str, str] | None) -> dict[str, View]:
    """{per-expert key: ``View``} for the fused experts stored in ``keys``, named as the model's
    ``UnfusedExperts`` name them. gpt-oss's: ``experts.E.gate_up_proj.weight`` is
    ``experts.gate_up_proj[E]`` transposed, ``experts.E.gate_up_proj.bias`` is ``gate_up_proj_bias[E]``.
    Gated ones (with the checkpoint's ``names``, e.g. w1, w3, w2): ``experts.E.w1.weight`` is the first
    half of ``gate_up_proj[E]``'s rows, ``w3`` the second, ``w2`` is ``down_proj[E]``. Per stored key,
    the views are in expert order, then row order. ``shape(key)``: a stored shape."""
    views: dict[str, View] = {}
    for prefix, kind in fused_stores(keys).items():
        interleaved = kind == "interleaved"
        if not interleaved and names is None:
            continue
        for param, layers in fused_parts(InterleavedExpert.names if interleaved else names).items():
            stored = f"{prefix}.{param}"
            for e in range(shape(stored)[0]):
                for part, layer in enumerate(layers):
                    views[f"{prefix}.{e}.{layer}.weight"] = View(stored, e, interleaved, part, len(layers))
                if interleaved:
                    views[f"{prefix}.{e}.{layer}.bias"] = View(f"{stored}_bias", e, False)
    return views


class SplitExperts:
    """A conversion op (transformers' ``ConversionOps`` interface) that cuts one fused tensor into
    its experts, transposed to (out, in) for weights stored (in, out), each expert's rows into as many
    equal blocks as ``target_patterns`` has per expert (``[e0 gate, e0 up, e1 gate, ...]``), and makes each
    weight a 4-bit parameter as transformers' bitsandbytes op does (``Params4bit`` with the model's
    settings, quantized on its device). transformers 5.3's op quantizes one tensor per converter,
    so ``SplitConverter`` takes none and this op quantizes them all."""

    supports_many_to_many = False

    def __init__(self, transposed: bool) -> None:
        self.transposed = transposed

    @torch.no_grad()
    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str],
        target_patterns: list[str],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        (t,) = input_dict.values()
        t = t[0] if isinstance(t, list) else t
        parts = len(target_patterns) // t.shape[0]
        if parts * t.shape[0] != len(target_patterns):
            raise ValueError(f"{source_patterns[0]}: {t.shape[0]} experts stored, the model has {len(target_patterns)}")
        prefix = (full_layer_name or "").partition(target_patterns[0])[0]
        out = {}
        for e in range(t.shape[0]):
            blocks = (t[e].T if self.transposed else t[e]).chunk(parts, dim=0)
            for key, value in zip(target_patterns[e * parts : (e + 1) * parts], blocks, strict=True):
                value = value.contiguous()
                out[key] = _as_4bit(model, prefix + key, value) if model is not None else value
        return out


def _as_4bit(model: nn.Module, name: str, value: torch.Tensor) -> Any:
    """``value`` as the parameter ``name`` of ``model`` holds it: quantized if that is a ``Params4bit``."""
    import bitsandbytes as bnb

    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, param_name)
    if not isinstance(old, bnb.nn.Params4bit):
        return value
    module._is_hf_initialized = True
    return bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(value.device)


def split_converters(model: nn.Module) -> list[Any]:
    """The converters that load fused stored experts (gpt-oss's; a gated model's as transformers 5
    saves it) into ``model``'s ``UnfusedExperts`` layers, cut as ``fused_parts`` says."""
    from transformers.core_model_loading import WeightConverter

    class SplitConverter(WeightConverter):
        """A converter transformers attaches no quantization op to (``SplitExperts`` quantizes)."""

        @property
        def quantization_operation(self) -> None:
            return None

        @quantization_operation.setter
        def quantization_operation(self, _: Any) -> None:
            pass

    def converter(stored: str, per_expert: list[str], num: int, transposed: bool) -> Any:
        targets = [f".experts.{e}.{t}" for e in range(num) for t in per_expert]
        return SplitConverter(rf".experts.{stored}$", targets, operations=[SplitExperts(transposed)])

    out = []
    for m in {type(m[0]): m for m in model.modules() if isinstance(m, UnfusedExperts)}.values():
        num, interleaved = len(m), isinstance(m[0], InterleavedExpert)
        for param, layers in fused_parts(m[0].names).items():
            out.append(converter(param, [f"{x}.weight" for x in layers], num, interleaved))
            if interleaved:
                out.append(converter(f"{param}_bias", [f"{x}.bias" for x in layers], num, False))
    return out


def fused_left(model: nn.Module) -> list[tuple[str, int]]:
    """(name, bytes) of the fused experts modules ``model`` still holds (not loaded per matrix)."""
    return [
        (n, sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)))
        for n, m in model.named_modules()
        if _fused_params(m)
    ]


@contextlib.contextmanager
def unfused_experts_loading(enabled: bool = True) -> Iterator[None]:
    """While ``from_pretrained`` runs: fused experts become ``UnfusedExperts`` on the meta model
    (before the bitsandbytes conversion), and the converters that fuse the checkpoint's expert
    matrices are left out, so each loads into its own (4-bit) layer. ``enabled``: the checkpoint
    stores its experts per matrix (``stores_experts_per_matrix``); a fused one loads as it is."""
    if not enabled:
        yield
        return
    import transformers.modeling_utils as mu
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    before, mapping = Bnb4BitHfQuantizer._process_model_before_weight_loading, mu.get_model_conversion_mapping

    def before_weight_loading(self: Any, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        unfuse_(model)
        return before(self, model, *args, **kwargs)

    def conversion_mapping(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        transforms = mapping(model, *args, **kwargs)
        if has_unfused_experts(model):
            transforms = split_converters(model) + [t for t in transforms if not _is_fusing(t)]
        return transforms

    Bnb4BitHfQuantizer._process_model_before_weight_loading = before_weight_loading
    mu.get_model_conversion_mapping = conversion_mapping
    try:
        yield
    finally:
        Bnb4BitHfQuantizer._process_model_before_weight_loading = before
        mu.get_model_conversion_mapping = mapping


def checkpoint_renames(model_type: str) -> list[Any]:
    """The model type's key renamings (transformers' conversion mapping without its converters):
    what turns a checkpoint key into the model's parameter name, e.g. Mixtral's
    ``block_sparse_moe`` -> ``mlp``."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_checkpoint_conversion_mapping(model_type) or [] if isinstance(t, WeightRenaming)]


def renamed(key: str, renames: list[Any]) -> str:
    """``key`` after every renaming of ``renames`` that matches it."""
    for r in renames:
        key, _ = r.rename_source_key(key)
    return key


_PEFT_PATCHED = False


def keep_peft_from_refusing_experts() -> None:
    """PEFT (>= 0.18, on transformers 5) rewrites, for adapters trained on transformers 4, a LoRA
    config that names Mixtral's or Qwen-MoE's expert matrices (``w1``, ``gate_proj``, ...) into
    ``target_parameters`` on the fused 3-D experts, and an adapter's per-expert tensors into fused
    ones. On a model whose experts are ``UnfusedExperts`` those names are real linear layers: both
    rewrites are skipped there (and only there). Installed once per process."""
    global _PEFT_PATCHED
    if _PEFT_PATCHED:
        return
    import peft.utils.transformers_weight_conversion as twc

    convert_config = twc.convert_peft_config_for_transformers
    convert_state = twc.convert_peft_adapter_state_dict_for_transformers

    def config_unless_unfused(peft_config: Any, model: nn.Module, conversions: Any) -> None:
        if not has_unfused_experts(model):
            convert_config(peft_config, model=model, conversions=conversions)

    def state_unless_unfused(model: nn.Module, peft_config: Any, adapter_state_dict: Any, **kw: Any) -> Any:
        if has_unfused_experts(model):
            return adapter_state_dict
        return convert_state(model=model, peft_config=peft_config, adapter_state_dict=adapter_state_dict, **kw)

    twc.convert_peft_config_for_transformers = config_unless_unfused
    twc.convert_peft_adapter_state_dict_for_transformers = state_unless_unfused
    _PEFT_PATCHED = True
