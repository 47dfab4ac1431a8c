"""The PEFT-compatible API: ``get_qolora_model``, ``save_adapter``, ``load_adapter``."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import quant
from .adapter_dir import AdapterDir, AdapterMeta, read_adapter_dir, write_adapter_dir
from .choices import FACTORED_INITS, INIT_SOURCES
from .files import FACTORS_FILE, WEIGHTS_FILE
from .initialize import init_factored_, iter_targets, restore_olora_
from .inits import InitSpec
from .precision import dtype_name
from .report import InitReport

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

logger = logging.getLogger(__name__)


@dataclass
class QoloraState:
    """What a QOLoRA PeftModel carries beside PEFT's own state (``model.qolora_states[name]``)."""

    meta: AdapterMeta
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    report: InitReport | None = None
    on_residual_of: str | None = None  # a plain adapter added on this OLoRA adapter's residual base
    base_factors: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)  # loftq's


def _init_spec(lora_config: LoraConfig, init: str | None, init_iters: int | None, svd_niter: int | None) -> InitSpec:
    """The init to run: ``init`` if given, else PEFT's ``init_lora_weights`` ("olora", "pissa",
    "pissa_niter_K", "loftq" with its ``loftq_config.loftq_iter``, True / "lora")."""
    if init is None:
        value = lora_config.init_lora_weights
        name = value.lower() if isinstance(value, str) else value
        if name is True or name == "lora":
            init = "lora"
        elif isinstance(name, str) and name.startswith("pissa_niter_") and name[len("pissa_niter_") :].isdigit():
            niter = int(name[len("pissa_niter_") :])
            init, svd_niter = "pissa", niter if svd_niter is None else svd_niter
        elif name in FACTORED_INITS:
            init = name
        else:
            raise ValueError(
                f"init_lora_weights: QOLoRA supports {', '.join(repr(i) for i in FACTORED_INITS)}, 'pissa_niter_K' and "
                f"True/'lora', got {value!r}"
            )
        if init == "loftq" and init_iters is None:
            loftq = lora_config.loftq_config or {}
            if int(loftq.get("loftq_bits", 4)) != 4:
                got = loftq["loftq_bits"]
                raise ValueError(f"loftq_config.loftq_bits: QOLoRA's LoftQ runs on the 4-bit base, got {got}")
            init_iters = int(loftq.get("loftq_iter", 1))
    return InitSpec(init, 1 if init_iters is None else init_iters, svd_niter)


def _check_config(lora_config: LoraConfig, spec: InitSpec) -> None:
    if getattr(lora_config, "target_parameters", None) and spec.factored:
        raise ValueError(
            f"target_parameters: {list(lora_config.target_parameters)} are parameters, not layers, and the "
            f"{spec.method} init factors linear layers only; train them with init lora, or target their modules"
        )
    if getattr(lora_config, "use_dora", False):
        raise ValueError("use_dora: DoRA is not supported with QOLoRA's OLoRA init; set use_dora=False")
    if getattr(lora_config, "lora_bias", False):
        raise ValueError("lora_bias: not supported with QOLoRA's OLoRA init; set lora_bias=False")


def _base_meta(model: nn.Module, init: str, init_source: str, checkpoint: Path | None) -> AdapterMeta:
    """Record the base: its path, fingerprint, 4-bit settings, unquantized layers and dtype."""
    base_name = getattr(model, "name_or_path", None) or None
    folder = checkpoint or quant.find_checkpoint(base_name)
    settings = None
    quantized, float_linears = [], []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if quant.is_4bit(m):
            quantized.append(name.removesuffix(".base_layer"))
            if settings is None:
                settings = quant.quant_settings(m).to_dict()
                settings["compute_dtype"] = dtype_name(m.compute_dtype or torch.float32)
                settings["device"] = m.weight.device.type  # NF4 kernels may round differently per device
        elif isinstance(m, nn.Linear) and m is not head and ".lora_" not in name:
            float_linears.append(name.removesuffix(".base_layer"))
    if settings is not None:
        settings["skip_modules"] = float_linears  # reload keeps exactly these unquantized
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = (
        emb.weight.dtype
        if emb is not None
        else next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    )
    return AdapterMeta(
        init=init,
        init_source=init_source,
        base_model=str(base_name) if base_name else None,
        checkpoint=str(Path(folder).resolve()) if folder else None,
        fingerprint=quant.fingerprint(folder) if folder else None,
        quant=settings,
        dtype=dtype_name(dtype),
        quantized_modules=quantized,
    )


def _layer_shape(m: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear, 4-bit linear or Conv1D layer; None for anything else."""
    if isinstance(m, nn.Linear):
        return int(m.out_features), int(m.in_features)
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and w is not None and w.ndim == 2:
        return int(w.shape[1]), int(w.shape[0])
    return None


MOE_GATES = ("shared_expert_gate",)  # linear layers that route, not transform: left out of all-linear


def resolved_targets(model: nn.Module, lora_config: LoraConfig) -> LoraConfig:
    """``lora_config`` with ``target_modules`` as PEFT resolves it for ``model``: PEFT's default for
    the model type where none is given (``get_peft_model(model, LoraConfig())`` does the same), and
    "all-linear" expanded (without MoE routing gates, ``MOE_GATES``). A copy; ``lora_config`` is not
    changed.

    Raises:
        ValueError: no target_modules, no target_parameters and no PEFT default for the model type.
    """
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    cfg = copy.deepcopy(lora_config)
    if cfg.target_modules is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        found = DEFAULTS.get(kind)
        if found is None and not getattr(cfg, "target_parameters", None):
            raise ValueError(
                f"adapter.target_modules: none given and PEFT has no default for model type {kind!r}; "
                "name the layers (for example all-linear)"
            )
        cfg.target_modules = found if found is None or isinstance(found, str) else set(found)
    all_linear = isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear"
    cfg = _maybe_include_all_linear_layers(cfg, model) if cfg.target_modules is not None else cfg
    if all_linear:  # a MoE's routing gates are no layer to adapt (Qwen2-MoE's shared_expert_gate: 1 output)
        gates = {n for n in cfg.target_modules if n.rsplit(".", 1)[-1] in MOE_GATES}
        if gates:
            cfg.target_modules = set(cfg.target_modules) - gates
            logger.info("all-linear leaves out %d MoE routing gates (%s)", len(gates), ", ".join(sorted(gates)[:2]))
    return cfg


def check_ranks(model: nn.Module, lora_config: LoraConfig) -> None:
    """Check each targeted layer's rank (``r``, or its ``rank_pattern`` entry) against the layer,
    before PEFT allocates any factor. Targets are PEFT's: default target_modules, ``exclude_modules``,
    ``layers_to_transform`` and ``modules_to_save`` are honoured as ``get_peft_model`` honours them.

    Raises:
        ValueError: naming, of the targeted layers whose rank exceeds their min(out, in), the smallest.
    """
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    cfg = resolved_targets(model, lora_config)
    if cfg.target_modules is None:
        return  # target_parameters only: PEFT checks its own
    pattern = getattr(lora_config, "rank_pattern", None) or {}
    targeted = [(name, m) for name, m in model.named_modules() if check_target_module_exists(cfg, name)]
    if not targeted:
        t = lora_config.target_modules
        raise ValueError(
            f"adapter.target_modules: {sorted(t) if isinstance(t, (set, list)) else t!r} matches no layer of the model"
        )
    over = []  # (min(out, in), name, shape, rank, rank_pattern key or None) of each layer its rank exceeds
    for name, m in targeted:
        shape = _layer_shape(m)
        key = get_pattern_key(list(pattern), name)
        r = pattern.get(key, lora_config.r)
        if shape and r > min(shape):
            over.append((min(shape), name, shape, r, key if key in pattern else None))
    if over:
        limit, name, shape, r, key = min(over)
        which = f"rank_pattern[{key!r}]: rank {r}" if key else f"adapter.r: rank {r}"
        raise ValueError(
            f"{which} exceeds min(out, in) = {limit} of {name} ({shape[0]}x{shape[1]}); choose r <= {limit}"
        )


def _check_base(model: nn.Module) -> None:
    """Refuse bases QOLoRA would corrupt, and keep bitsandbytes' standard 4-bit layout."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "model already has PEFT adapter layers: get_qolora_model needs the plain base model; to train a second "
            "adapter, start again from qolora.load_quantized (one QOLoRA model per OLoRA adapter)"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    quant.check_supported(model, device)
    quant.keep_standard_layout_(model)


def get_qolora_model(
    model: nn.Module,
    lora_config: LoraConfig,
    *,
    adapter_name: str = "default",
    init_source: str = "auto",
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    balance: bool = False,
    init: str | None = None,
    init_iters: int | None = None,
    svd_niter: int | None = None,
) -> PeftModel:
    """Wrap ``model`` in a standard ``peft.PeftModel``, OLoRA- (or PiSSA-, LoftQ-) initialized exactly.

    A drop-in for ``peft.get_peft_model(model, LoraConfig(init_lora_weights="olora"))``, with
    QR on the original weights (streamed from the checkpoint), a thin QR, the quantization
    settings kept, ``fan_in_fan_out`` honoured, and the initial factors kept for exact reload.
    Rewrites ``model``'s frozen base weights in place (as PEFT does).

    Args:
        model: a transformers model, 4-bit (``load_quantized``) or unquantized.
        lora_config: a ``peft.LoraConfig``; ``init_lora_weights`` "olora", or True/"lora" for
            plain LoRA (Hu et al., arXiv 2106.09685).
        init_source: "auto", "checkpoint" or "dequantized" (see ``WeightSource``).
        checkpoint: folder of the original safetensors, if not the model's own.
        progress: show a progress bar.
        balance: rescale each OLoRA component to equal factor norms (``olora.balance_factors``):
            the same B·A and base, factors no longer equal PEFT's. Ignored for plain LoRA.
        init: "olora", "pissa", "loftq" or "lora", instead of ``init_lora_weights`` (PEFT's
            ``LoraConfig`` needs scipy to even accept "loftq").
        init_iters: quantization rounds T of an iterated olora or of loftq (default 1; loftq:
            ``loftq_config.loftq_iter``); both need a 4-bit base beyond one round.
        svd_niter: pissa by ``torch.svd_lowrank`` with this many power iterations (PEFT's
            "pissa_niter_K"); default the exact SVD.

    Returns:
        A ``peft.PeftModel``; ``model.qolora_states[adapter_name].report`` is the init report.
    """
    spec = _init_spec(lora_config, init, init_iters, svd_niter)
    _check_config(lora_config, spec)
    if init_source not in INIT_SOURCES:
        raise ValueError(f"init_source: expected one of {INIT_SOURCES}, got {init_source!r}")
    _check_base(model)
    check_ranks(model, lora_config)
    if (spec.method == "loftq" or spec.iters > 1) and not any(quant.is_4bit(m) for m in model.modules()):
        raise ValueError(
            f"adapter.init {spec.label}: its rounds refit to what 4-bit quantization loses, and this base is not "
            "quantized; load it in 4-bit (quant.type nf4) or use olora / pissa with one round"
        )
    cfg = resolved_targets(model, lora_config)  # a copy; all-linear expanded, MoE routing gates left out
    cfg.init_lora_weights = False if spec.factored else True
    peft_model = _get_peft_model(model, cfg, adapter_name)
    recorded = lora_config.init_lora_weights if init is None else spec.peft_name
    if recorded == "loftq" and not lora_config.loftq_config:  # PEFT's LoraConfig refuses "loftq" without one
        recorded = True
    peft_model.peft_config[adapter_name].init_lora_weights = recorded
    if spec.factored:
        result = init_factored_(peft_model, spec, adapter_name, init_source, checkpoint, progress, balance)
        meta = _base_meta(model, spec.method, init_source, result.checkpoint)
        meta.layer_sources = {x.name: x.source for x in result.report.layers}
        meta.transposed = sorted(result.transposed)
        meta.init_iters, meta.svd_niter = spec.iters, spec.svd_niter
        state = QoloraState(meta, result.factors, result.report, base_factors=result.base_factors)
    else:
        state = QoloraState(_base_meta(model, spec.method, init_source, None))
    state.meta.adapter_name = adapter_name
    peft_model.qolora_states = {adapter_name: state}
    _guard_add_adapter(peft_model)
    return peft_model


def meta_peft_model(base: nn.Module, lora_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """The PEFT LoRA structure on a meta-device ``base``, without an init: an FSDP rank other than 0
    receives every value of rank 0's model into it (``qolora.fsdp.load_sharded_``)."""
    cfg = resolved_targets(base, lora_config)  # the targets rank 0's get_qolora_model takes
    cfg.init_lora_weights = True
    return _get_peft_model(base, cfg, adapter_name)


def _get_peft_model(model: nn.Module, cfg: Any, adapter_name: str) -> Any:
    """``peft.get_peft_model``, without the FutureWarning PEFT 0.21 itself causes by reading
    transformers' renamed ``is_gradient_checkpointing`` (ours to hide, not the user's to fix)."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, cfg, adapter_name=adapter_name)


def _guard_add_adapter(peft_model: Any) -> None:
    """Make ``peft_model.add_adapter`` refuse what would silently break the QOLoRA base.

    PEFT's own ``olora`` init rewrites the shared 4-bit base (and re-quantizes it a second time):
    an ``olora`` adapter added on an OLoRA base gets that base's initial factors instead
    (``_set_initial_factors_``), and elsewhere such inits are refused. Any second adapter on an
    OLoRA base sits on the first adapter's residual, which ``save_adapter`` cannot record: such an
    adapter may be added (PEFT's OLoRA -> LoRA conversion, ``save_pretrained(
    path_initial_model_for_weight_conversion=...)``, loads the initial adapter as a temporary one;
    TRL's DPOTrainer adds a frozen reference copy) but ``save_adapter`` refuses it. Plain LoRA
    adapters on a plain-LoRA QOLoRA model are fine.
    """
    original = peft_model.add_adapter

    def add_adapter(adapter_name: str, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        init = getattr(peft_config, "init_lora_weights", True)
        olora = [name for name, s in peft_model.qolora_states.items() if s.meta.factored]
        copy_of = None
        same = olora and isinstance(init, str) and init.lower() == _peft_name(peft_model.qolora_states[olora[0]].meta)
        if same:
            copy_of = olora[0]  # OLoRA on this base is its initial factors: no QR, no base rewrite
            peft_config = copy.deepcopy(peft_config)
            peft_config.init_lora_weights = False
        elif isinstance(init, str) and init.lower() not in ("lora", "gaussian"):
            raise ValueError(
                f"add_adapter({adapter_name!r}): init_lora_weights={init!r} would let PEFT rewrite the 4-bit base that "
                "QOLoRA initialized; make a separate model with qolora.get_qolora_model for each OLoRA adapter"
            )
        result = original(adapter_name, peft_config, *args, **kwargs)
        if copy_of is not None:
            _set_initial_factors_(peft_model, adapter_name, peft_model.qolora_states[copy_of])
            peft_model.peft_config[adapter_name].init_lora_weights = init
        meta = copy.deepcopy(next(iter(peft_model.qolora_states.values())).meta)
        meta.adapter_name = adapter_name
        # a plain adapter on another adapter's OLoRA residual leaves the base as it is (PEFT's own OLoRA ->
        # LoRA conversion loads the initial adapter this way), but save_adapter could not record its base
        peft_model.qolora_states[adapter_name] = QoloraState(meta, on_residual_of=olora[0] if olora else None)
        return result

    def delete_adapter(adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        result = original_delete(adapter_name, *args, **kwargs)
        peft_model.qolora_states.pop(adapter_name, None)
        return result

    original_delete = peft_model.delete_adapter
    peft_model.add_adapter = add_adapter
    peft_model.delete_adapter = delete_adapter


def _set_initial_factors_(peft_model: Any, adapter_name: str, source: QoloraState) -> None:
    """Give a newly added OLoRA-init adapter the initial factors of the OLoRA adapter whose residual the
    base holds, so the model it adds starts at W, as OLoRA's init means. TRL's DPOTrainer adds its
    frozen reference adapter this way (a copy of the config, then of the weights).

    Raises:
        ValueError: when its layers or scales differ from the source adapter's (the base cannot serve
            both); the adapter is removed again first.
    """
    name = source.meta.adapter_name
    try:
        targets = list(iter_targets(peft_model, adapter_name))
        if {t.name for t in targets} != set(source.factors):
            raise ValueError(f"its target layers differ from adapter {name!r}'s")
        for t in targets:
            B0, A0 = source.factors[t.name]
            if float(t.lora.scaling[adapter_name]) != float(t.lora.scaling[name]) or int(t.lora.r[adapter_name]) != int(
                t.lora.r[name]
            ):
                raise ValueError(f"its rank or scale at {t.name} differs from adapter {name!r}'s")
            for w, f in ((t.lora.lora_A[adapter_name].weight, A0), (t.lora.lora_B[adapter_name].weight, B0)):
                w.data.copy_(f.to(device=w.device, dtype=w.dtype))
    except ValueError as e:
        peft_model.delete_adapter(adapter_name)
        raise ValueError(
            f"add_adapter({adapter_name!r}) with init_lora_weights='olora': {e}; the 4-bit base holds that adapter's "
            "residual, so an OLoRA adapter on it must have the same layers, rank and alpha"
        ) from e


def _peft_name(meta: AdapterMeta) -> str:
    """The ``init_lora_weights`` string that names this adapter's init in PEFT."""
    name = InitSpec(meta.init, meta.init_iters, meta.svd_niter).peft_name
    return str(name).lower()


def _state(model: nn.Module, adapter_name: str) -> QoloraState:
    states = getattr(model, "qolora_states", None)
    if not states or adapter_name not in states:
        raise ValueError(
            f"adapter {adapter_name!r} has no QOLoRA state: make the model with get_qolora_model or load_adapter"
        )
    return states[adapter_name]


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a PEFT adapter dir plus ``qolora.json`` and ``initial_factors.safetensors``.

    ``state_dict``: the model's trainable state to write instead of its own parameters (an FSDP
    model's adapter, gathered from its shards by ``distributed.full_trainable_state``).

    The dir is written beside its final place and renamed into it, so an interrupted save
    never leaves a dir that looks complete; an existing dir is replaced.
    """
    state = _state(model, adapter_name)
    if state.on_residual_of:
        raise ValueError(
            f"save_adapter({adapter_name!r}): it was added on the OLoRA residual of adapter {state.on_residual_of!r}, "
            "which its files could not record; make a separate model with qolora.get_qolora_model for it"
        )

    def save_peft(tmp: Path) -> None:
        model.save_pretrained(str(tmp), selected_adapters=[adapter_name], state_dict=state_dict)
        if adapter_name != "default":  # PEFT nests non-default adapters one level down
            for f in (tmp / adapter_name).iterdir():
                f.rename(tmp / f.name)
            (tmp / adapter_name).rmdir()

    out = write_adapter_dir(out_dir, save_peft, state.meta, state.factors, state.base_factors)
    logger.info("saved adapter %r to %s", adapter_name, out)
    return out


def load_recorded_base(meta: AdapterMeta, meta_path: Path, device_map: Any = None) -> nn.Module:
    """The base model an adapter was made on, loaded as at init (4-bit settings, dtype)."""
    ref = meta.checkpoint or meta.base_model
    if not ref or not Path(ref).is_dir():
        raise FileNotFoundError(
            f"base model {ref!r} recorded in {meta_path} was not found; pass base_model= or restore it"
        )
    q = quant.QuantSettings.from_dict(meta.quant) if meta.quant else None
    return quant.load_base(
        ref,
        quant_type=q.quant_type if q else "none",
        compute_dtype=(meta.quant or {}).get("compute_dtype", "auto"),
        dtype=meta.dtype,  # the load dtype, which may differ from the compute dtype
        double_quant=q.double_quant if q else False,
        skip_modules=(meta.quant or {}).get("skip_modules"),
        device_map=device_map,
    )


def load_adapter(
    adapter_dir: str | os.PathLike[str],
    base_model: nn.Module | None = None,
    *,
    is_trainable: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    device_map: Any = None,
    progress: bool = True,
) -> PeftModel:
    """Load an adapter saved by ``save_adapter``: rebuild the residual base, attach the adapter.

    No QR runs: the residual is W − s·B0·A0 from the recorded source and initial factors, so
    on CPU the logits are bit-identical to the model that was saved. Only safetensors and
    JSON are read; nothing is unpickled.

    Args:
        adapter_dir: the dir written by ``save_adapter``.
        base_model: the base, loaded as at init; default: loaded from the recorded checkpoint.
        is_trainable: keep the adapter trainable (default: inference mode).
        checkpoint: where the original weights are now, if they moved.

    Raises:
        FileNotFoundError: a missing adapter file or base checkpoint (named).
        ValueError: a changed base checkpoint, or an adapter that does not fit the base.
    """
    from peft import LoraConfig

    ad = read_adapter_dir(adapter_dir)
    meta, meta_path = ad.meta, ad.meta_path
    folder = ad.verify_base(checkpoint)
    if base_model is None:
        base_model = load_recorded_base(meta, meta_path, device_map)
    _check_base(base_model)
    is_4bit = any(quant.is_4bit(m) for m in base_model.modules())
    if is_4bit != (meta.quant is not None):
        raise ValueError(f"{meta_path}: adapter was made on a {'4-bit' if meta.quant else 'unquantized'} base")
    cfg = LoraConfig.from_pretrained(str(ad.dir))
    recorded_init = cfg.init_lora_weights
    cfg.init_lora_weights = False if meta.factored else True
    cfg.inference_mode = not is_trainable
    name = meta.adapter_name
    peft_model = _get_peft_model(base_model, cfg, name)
    if meta.factored:
        try:
            restore_olora_(
                peft_model,
                name,
                ad.base,
                meta.layer_sources,
                str(folder) if folder else None,
                progress,
                str(ad.dir / FACTORS_FILE),
            )
        except KeyError as e:
            raise ValueError(f"{meta_path}: no recorded init source for layer {e}") from e
    _load_weights(peft_model, ad, name)
    peft_model.peft_config[name].init_lora_weights = recorded_init
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
        peft_model.eval()
    base_factors = {} if meta.init != "loftq" else dict(ad.base)
    peft_model.qolora_states = {name: QoloraState(meta, ad.initial, base_factors=base_factors)}
    _guard_add_adapter(peft_model)
    return peft_model


def _match_saved_dtypes_(peft_model: nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Give each adapter weight the dtype it was saved in, before its values are copied in.

    A trainer may leave the LoRA weights in another dtype than the one PEFT creates them in (TRL's
    SFTTrainer casts them to bf16, also on the CPU); PEFT's LoRA forward runs in the weights' dtype,
    so reloading them upcast would be another model. The safetensors file records each dtype.
    """
    changed = set()
    for pname, p in peft_model.named_parameters():
        key = pname.replace(f".{name}.", ".").removesuffix(f".{name}")
        saved = tensors.get(key)
        if saved is not None and saved.dtype != p.dtype:
            p.data = p.data.to(saved.dtype)
            changed.add(str(saved.dtype).removeprefix("torch."))
    if changed:
        logger.info("adapter weights kept in %s, the dtype they were saved in", ", ".join(sorted(changed)))


def _load_weights(peft_model: nn.Module, ad: AdapterDir, name: str) -> None:
    from peft import set_peft_model_state_dict

    where = ad.dir / WEIGHTS_FILE
    _match_saved_dtypes_(peft_model, ad.tensors, name)
    result = set_peft_model_state_dict(peft_model, ad.tensors, adapter_name=name)
    if result.unexpected_keys:
        raise ValueError(f"{where}: unexpected tensors {result.unexpected_keys[:3]}")
    n_layers = len(list(iter_targets(peft_model, name)))
    if len(ad.tensors) < 2 * n_layers:
        raise ValueError(f"{where}: {len(ad.tensors)} tensors for {n_layers} LoRA layers")
