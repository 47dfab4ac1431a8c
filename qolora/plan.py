"""Memory planner: will a QLoRA/OLoRA fine-tune fit on a GPU? Reads ``config.json`` only.

Every line is an estimate in bytes for one GPU. Weights, adapters and optimizer states are
counted exactly (checked against real and meta-device models in the tests); activations
follow the saved-tensor count of a Llama-style decoder layer, checked on the CPU.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import OPTIMIZERS

GiB = 1 << 30

MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this


def optimizer_state_bytes(numel: int, optimizer: str) -> int:
    """Adam state bytes of one parameter tensor: two fp32 moments, or for 8-bit two uint8
    moments plus one fp32 absmax per 256-element block each (bitsandbytes' blockwise 8-bit)."""
    if optimizer == "paged_adamw_8bit" and numel >= MIN_8BIT_SIZE:
        return 2 * numel + 2 * 4 * math.ceil(numel / 256)
    return 8 * numel


CUDA_OVERHEAD = int(0.75 * GiB)  # CUDA context, cuBLAS workspaces and allocator slack


@dataclass
class Shape:
    """The parts of a decoder-only transformer config that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Shape:
        try:
            h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            return cls(
                hidden=h,
                intermediate=int(c["intermediate_size"]),
                layers=int(c["num_hidden_layers"]),
                vocab=int(c["vocab_size"]),
                heads=heads,
                kv_heads=int(c.get("num_key_value_heads") or heads),
                head_dim=int(c.get("head_dim") or h // heads),
                tied=bool(c.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ValueError(f"config.json: missing field {e}; plan supports Llama-style decoder configs") from e

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of the linear layers of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


@dataclass
class Held:
    """What a model of this config holds once QOLoRA has loaded it in 4-bit, from its meta-device twin
    (``held_from_config``): the element count of each layer that loads as 4-bit, of the linear layers
    that stay in full precision (and their types), and of every other parameter (embeddings, norms,
    lm_head, biases, fused MoE experts: parameters, not linear layers, so not 4-bit)."""

    four_bit: list[int]
    full_linear: int
    full_linear_types: list[str]
    other: int
    experts: int = 0  # of ``other``: 3-D parameters (fused MoE experts QOLoRA cannot load per matrix)
    expert_linears: list[tuple[int, int]] = field(default_factory=list)  # (out, in) of each 4-bit expert matrix
    moe: MoE | None = None
    eager_attention: bool = False  # transformers' default for the model is eager (gpt-oss's sinks): T x T probabilities


@dataclass
class MoE:
    """A MoE model's parameters by role: every expert, the ones a token runs through, the router."""

    num_experts: int  # per MoE layer
    active_experts: int  # per token and layer (``num_experts_per_tok``)
    total: int  # every parameter of the model
    experts: int  # the routed experts' matrices and biases
    router: int  # the routers' weights (and biases): kept in the compute dtype, not 4-bit
    one_expert: list[tuple[int, int]]  # (out, in) of one expert's matrices
    act_saved: int = 3  # tensors of the intermediate width one expert's activation saves (gpt-oss's clamped: 7)

    @property
    def active(self) -> int:
        """Parameters one token runs through: all but the experts it is not routed to."""
        return self.total - self.experts + self.experts * self.active_experts // self.num_experts

    @property
    def intermediate(self) -> int:
        """One expert's intermediate width: the in_features of its down projection (out = hidden)."""
        hidden = self.one_expert[0][1]  # the first matrix reads the hidden state
        return next(i for o, i in self.one_expert if o == hidden)

    def line(self) -> str:
        return (
            f"MoE: {self.num_experts} experts per layer, {self.active_experts} active per token: "
            f"{self.total / 1e9:.1f}B parameters, {self.active / 1e9:.1f}B active; "
            f"experts {self.experts / 1e9:.1f}B (4-bit), router {self.router / 1e6:.2f}M (compute dtype); "
            "expert offload to the CPU is not built"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "active_experts": self.active_experts,
            "total_params": self.total,
            "active_params": self.active,
            "expert_params": self.experts,
            "router_params": self.router,
        }


def held_from_config(c: dict[str, Any]) -> Held | None:
    """``Held`` for the config dict ``c``, or None when transformers cannot build it (no ``model_type``,
    or one it does not know): the plan then counts the Llama-style shape alone."""
    from .quant.experts import InterleavedExpert, UnfusedExperts, unfuse_
    from .quant.loading import converted_to_4bit, is_linear, kept_in_full_precision, meta_model

    try:
        model = meta_model(c)
        model.tie_weights()  # tied embeddings are one tensor, as from_pretrained makes them
    except Exception:  # noqa: BLE001 - no model_type, an unknown or remote-code one: the shape formula stands
        return None
    unfuse_(model)  # the experts as QOLoRA loads them: one 4-bit linear layer per stored matrix
    head = model.get_output_embeddings()
    four, full, types, counted, expert_linears = [], 0, set(), set(), []
    for name, m in model.named_modules():
        if m is head or not is_linear(m):
            continue
        w = m.weight
        counted.add(id(w))
        if converted_to_4bit(m) and not kept_in_full_precision(model, name):
            four.append(w.numel())
            if ".experts." in name:
                expert_linears.append(tuple(w.shape))
        else:
            full += w.numel()
            types.add(type(m).__name__)
    seen: set[int] = set()
    other = experts = 0
    for p in model.parameters():
        if id(p) not in counted and id(p) not in seen:
            seen.add(id(p))
            other += p.numel()
            experts += p.numel() if p.ndim >= 3 else 0
    unfused = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    moe = None
    if unfused:
        routers = [
            m for n, m in model.named_modules() if "Router" in type(m).__name__ or n.endswith((".gate", ".router"))
        ]
        moe = MoE(
            num_experts=unfused[0].num_experts,
            active_experts=int(c.get("num_experts_per_tok") or unfused[0].num_experts),
            total=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            experts=sum(p.numel() for m in unfused for p in m.parameters()),
            router=sum(p.numel() for m in routers for p in m.parameters()),
            one_expert=[tuple(x.weight.shape) for x in unfused[0][0].modules() if is_linear(x)],
            act_saved=7 if isinstance(unfused[0][0], InterleavedExpert) else 3,
        )
    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    return Held(four, full, sorted(types), other, experts, expert_linears, moe, eager)


def nf4_stats_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight's quant_state statistics: fp32 absmax per block, or with double
    quant uint8 absmax plus fp32 absmax² per 256 blocks and one fp32 offset."""
    blocks = math.ceil(numel / blocksize)
    if not double_quant:
        return 4 * blocks
    return blocks + 4 * math.ceil(blocks / 256) + 4


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight in bitsandbytes: packed data (two values a byte) plus its statistics."""
    return math.ceil(numel / 2) + nf4_stats_bytes(numel, blocksize, double_quant)


CPU_PREFIX = "on the CPU: "  # components with this prefix are host memory, not counted against the GPU


def gpu_total(comp: dict[str, int]) -> int:
    """The bytes on one GPU: every component but those kept on the CPU."""
    return sum(v for k, v in comp.items() if not k.startswith(CPU_PREFIX))


@dataclass
class Plan:
    components: dict[str, int]
    total_bytes: int  # on one GPU
    gpu_bytes: int
    fits: bool
    max_seq_len: int
    gpus: int = 1
    mode: str = "single"  # single | ddp | fsdp | fsdp+offload
    moe: MoE | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "components": self.components,
            "total_bytes": self.total_bytes,
            "cpu_bytes": sum(self.components.values()) - self.total_bytes,
            "fits": self.fits,
            "max_seq_len": self.max_seq_len,
            "gpus": self.gpus,
            "mode": self.mode,
            **({"moe": self.moe.to_json()} if self.moe else {}),
        }

    def __str__(self) -> str:
        w = max(len(k) for k in self.components)
        gpu = {k: v for k, v in self.components.items() if not k.startswith(CPU_PREFIX)}
        cpu = {k: v for k, v in self.components.items() if k.startswith(CPU_PREFIX)}
        where = "one GPU" if self.gpus == 1 else f"each of {self.gpus} GPUs ({self.mode})"
        lines = [f"per GPU, {where}:"] + [f"{k:<{w}}  {v / GiB:>8.3f} GiB" for k, v in gpu.items()]
        lines += [
            "-" * (w + 14),
            f"{'total':<{w}}  {self.total_bytes / GiB:>8.3f} GiB of {self.gpu_bytes / GiB:.1f} GiB",
        ]
        lines += [f"{k:<{w}}  {v / GiB:>8.3f} GiB (per process)" for k, v in cpu.items()]
        lines.append(f"{'fits' if self.fits else 'DOES NOT FIT'}; largest seq-len that fits: {self.max_seq_len}")
        if self.moe is not None:
            lines.append(self.moe.line())
        if self.mode.startswith("fsdp"):
            lines.append(
                "note: a prediction for FSDP-QLoRA (quant storage = compute dtype), as train.distributed: fsdp "
                "runs it (rank 0 also holds the whole 4-bit model in CPU RAM while it sends it); qolora train has no "
                "CPU offload of the shards yet, so --offload is a prediction only"
            )
        return "\n".join(lines)


def components(
    s: Shape,
    seq_len: int,
    batch: int,
    rank: int,
    *,
    optimizer: str = "paged_adamw_8bit",
    dtype_bytes: int = 2,
    gradient_checkpointing: bool = True,
    chunked_ce: bool = True,
    ce_chunk: int = 1024,
    offload: bool = False,
    double_quant: bool = True,
    gpus: int = 1,
    fsdp: bool = False,
    fsdp_offload: bool = False,
    held: Held | None = None,
) -> dict[str, int]:
    """Bytes per component on one GPU for one training step (all linear layers of every decoder
    layer targeted; ``batch`` is per GPU). With ``held`` (``held_from_config``) the weights are
    counted as the model's own modules load, not from the Llama-style shape: linear layers that
    stay in full precision get a line of their own, and parameters that are no linear layers
    (fused MoE experts) count as unquantized.

    With ``gpus`` > 1 and no ``fsdp`` (DDP) every GPU holds the whole model plus DDP's gradient
    buckets. With ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer and at the root, as
    accelerate wraps a Llama) each GPU holds 1/N of every parameter, adapter, gradient and
    optimizer state; the quant_state statistics are no parameters and stay whole on every rank;
    the root's parameters (embeddings, final norm, lm_head) are gathered for the whole step, and
    two decoder layers at a time (the current one and the prefetched one), with one layer's
    unsharded adapter gradients before the reduce-scatter. ``fsdp_offload`` keeps the shards,
    their gradients and the optimizer on the CPU (lines prefixed ``CPU_PREFIX``).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if gpus < 1:
        raise ValueError(f"gpus: must be >= 1, got {gpus}")
    if fsdp and gpus < 2:
        raise ValueError("--fsdp shards the model across GPUs: give --gpus 2 or more")
    if fsdp_offload and not fsdp:
        raise ValueError("--offload moves FSDP's parameter shards to the CPU: it needs --fsdp")
    lin = s.linears()
    w4 = s.layers * sum(nf4_bytes(o * i, double_quant=double_quant) for o, i in lin)
    w4_stats = s.layers * sum(nf4_stats_bytes(o * i, double_quant=double_quant) for o, i in lin)
    embed = s.vocab * s.hidden * (1 if s.tied else 2)
    norms = (2 * s.layers + 1) * s.hidden
    unquantized_numel, full_linear, full_label, experts = embed + norms, 0, "", 0
    if held is not None:
        w4 = sum(nf4_bytes(n, double_quant=double_quant) for n in held.four_bit)
        w4_stats = sum(nf4_stats_bytes(n, double_quant=double_quant) for n in held.four_bit)
        unquantized_numel = held.other - held.experts  # every parameter that is no linear layer, as the model has it
        experts = held.experts * dtype_bytes
        full_linear = held.full_linear * dtype_bytes
        full_label = f"linear layers kept in full precision ({', '.join(held.full_linear_types)})"
    # the adapted layers: each decoder layer's linears; for a MoE model, attention and every expert matrix
    expert_lin = held.expert_linears if held is not None else []
    adapted = lin[:4] * s.layers + expert_lin if expert_lin else lin * s.layers
    adapter_params = sum(rank * (o + i) for o, i in adapted)
    tokens = batch * seq_len
    h, i, kv, q = s.hidden, s.intermediate, s.kv_heads * s.head_dim, s.heads * s.head_dim
    # Bytes one decoder layer saves for backward per token, as measured on the saved-tensor
    # hooks (tests/test_plan.py): q, k, v and gate, up, act(gate) in the compute dtype; the two
    # RMSNorm inputs upcast to fp32; the attention log-sum-exp; and, per LoRA target, its input
    # cast to the fp32 adapter dtype plus x·Aᵀ (r wide). The frozen 4-bit matmuls save no input.
    lora_in = 5 * h + q + i  # in_features of q, k, v, gate, up (h), o (q) and down (i)
    mlp = 3 * i  # gate, up, act(gate)
    moe = held.moe if held is not None else None
    if moe is not None:  # each token runs through k experts: each saves its gathered input, its activation's
        # tensors, its weighted output and its LoRA inputs; the router its logits and softmax (fp32)
        lora_in = 3 * h + q + moe.active_experts * sum(x for _, x in moe.one_expert)
        mlp = moe.active_experts * (moe.act_saved * moe.intermediate + 2 * h) + 4 * moe.num_experts
    per_token = dtype_bytes * (q + 2 * kv + mlp) + 4 * 2 * h + 4 * s.heads + 4 * (lora_in + 8 * rank)
    layer_saved = tokens * per_token
    if held is not None and held.eager_attention:  # eager attention saves its probabilities: heads x T x T
        layer_saved += dtype_bytes * batch * s.heads * seq_len * seq_len
    if gradient_checkpointing:
        saved = s.layers * tokens * h * dtype_bytes  # only each layer's input is kept...
        acts = (0 if offload else saved) + layer_saved  # ...plus one layer recomputed in backward
    else:
        acts = s.layers * layer_saved
    rows = ce_chunk if chunked_ce else tokens
    logits = rows * s.vocab * (4 + 4 + (0 if chunked_ce else dtype_bytes))  # fp32 logits + their grad (+ bf16)
    opt_bytes = sum(
        optimizer_state_bytes(rank * i, optimizer) + optimizer_state_bytes(o * rank, optimizer) for o, i in adapted
    )
    unquantized = unquantized_numel * dtype_bytes
    if not fsdp:
        model = {
            "4-bit weights (incl. double-quant stats)": w4,
            "unquantized params (embeddings, norms, lm_head)": unquantized,
            **({full_label: full_linear} if full_linear else {}),
            **({"fused MoE experts (unquantized: not 4-bit yet)": experts} if experts else {}),
            "adapters (fp32)": adapter_params * 4,
            "adapter gradients (fp32)": adapter_params * 4,
            f"optimizer states ({optimizer})": opt_bytes,
        }
        if gpus > 1:
            model["DDP gradient buckets (fp32)"] = adapter_params * 4
    else:
        n = gpus
        where = CPU_PREFIX if fsdp_offload else ""
        layer_w4 = sum(math.ceil(o * i / 2) for o, i in lin)
        layer_adapters = sum(rank * (o + i) for o, i in lin) * 4
        model = {
            f"{where}4-bit packed weights (1/{n} shard)": math.ceil((w4 - w4_stats) / n),
            f"{where}unquantized params (1/{n} shard)": math.ceil((unquantized + full_linear + experts) / n),
            f"{where}adapters (fp32, 1/{n} shard)": math.ceil(adapter_params * 4 / n),
            f"{where}adapter gradients (fp32, 1/{n} shard)": math.ceil(adapter_params * 4 / n),
            f"{where}optimizer states ({optimizer}, 1/{n} shard)": math.ceil(opt_bytes / n),
            "4-bit quant stats (whole on every rank)": w4_stats,
            "FSDP gathered root (embeddings, final norm, lm_head)": (embed + s.hidden) * dtype_bytes,
            "FSDP gathered decoder layers (2) and one layer's gradients": 2 * (layer_w4 + 2 * s.hidden * dtype_bytes)
            + 2 * layer_adapters
            + layer_adapters,
        }
    return {
        **model,
        "activations"
        + (" (checkpointed" + (", offloaded)" if offload else ")") if gradient_checkpointing else ""): acts,
        "logits and loss" + (f" (chunked CE, {ce_chunk} rows)" if chunked_ce else ""): logits,
        "CUDA context and allocator overhead": CUDA_OVERHEAD,
    }


def read_config(model: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(model)
    cfg = p / "config.json" if p.is_dir() else p
    if not cfg.is_file():
        try:
            from huggingface_hub import hf_hub_download

            cfg = Path(hf_hub_download(str(model), "config.json", local_files_only=True))
        except Exception as e:
            raise FileNotFoundError(
                f"{model}: no config.json (a local folder, a config.json or a cached hub id)"
            ) from e
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from e


def plan(
    model: str | os.PathLike[str] | dict[str, Any],
    seq_len: int,
    batch: int,
    rank: int,
    gpu_memory: str | int = "24GiB",
    **kw: Any,
) -> Plan:
    """The memory plan for training ``model`` (a folder, a config.json, a cached hub id, or the
    config as a dict) at (seq_len, batch per GPU, rank), on one GPU or, with ``gpus``/``fsdp``/
    ``fsdp_offload`` (see ``components``), on each of several."""
    for name, v in (("seq-len", seq_len), ("batch-size", batch), ("rank", rank)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    cfg = model if isinstance(model, dict) else read_config(model)
    s = Shape.from_config(cfg)
    kw = {"held": held_from_config(cfg), **kw}
    gpu = parse_bytes(gpu_memory)
    comp = components(s, seq_len, batch, rank, **kw)
    total = gpu_total(comp)

    def fits(t: int) -> bool:
        return gpu_total(components(s, t, batch, rank, **kw)) <= gpu

    lo, hi = 0, 1
    while fits(hi) and hi < (1 << 24):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    gpus, fsdp = kw.get("gpus", 1), kw.get("fsdp", False)
    mode = ("fsdp+offload" if kw.get("fsdp_offload") else "fsdp") if fsdp else ("ddp" if gpus > 1 else "single")
    held = kw["held"]
    return Plan(comp, total, gpu, total <= gpu, lo, gpus, mode, held.moe if held is not None else None)


def parse_bytes(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gib", GiB), ("gb", 10**9), ("mib", 1 << 20), ("mb", 10**6), ("g", GiB), ("m", 1 << 20)):
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"--gpu-memory: cannot read {text!r}; use e.g. 24GiB") from None
