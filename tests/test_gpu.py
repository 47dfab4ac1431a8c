"""What must hold on a CUDA GPU (``pytest -m gpu``; ``scripts/gpu_check.sh`` runs these first).

Left out of the default run. On a machine without CUDA they are skipped, except under
``QOLORA_GPU_REHEARSE=1``: then ``scripts/gpu_check.sh --rehearse`` runs them on the CPU, so
that their code cannot rot between GPU runs. Each test records what it measured with
``record`` (written to ``$QOLORA_GPU_RECORD`` when set), and gpu_check.py puts it in tests.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig

import qolora
from qolora import quant

from . import test_train
from .conftest import logits, perturb_lora_
from .test_data import packing_matches_one_by_one
from .test_export import FRESH, _trained_adapter

REHEARSE = os.environ.get("QOLORA_GPU_REHEARSE") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or REHEARSE),
        reason="needs a CUDA GPU (QOLORA_GPU_REHEARSE=1 runs these on the CPU as a rehearsal)",
    ),
]


@pytest.fixture
def record(request):
    """``record(key=value, ...)``: what this test measured, kept under its name."""
    path = os.environ.get("QOLORA_GPU_RECORD")
    name = request.node.name

    def put(**values) -> None:
        if not path:
            return
        data = json.loads(open(path).read()) if os.path.exists(path) else {}
        data.setdefault(name, {}).update(values)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    put(device=DEVICE)
    return put


def test_factors_on_the_device_equal_peft_olora(record) -> None:
    """QOLoRA's QR factors equal PEFT's ``init_lora_weights="olora"`` on the same fp32 weight, on this device."""
    from peft import get_peft_model

    from qolora.olora import olora_factors

    worst = {}
    for out_f, in_f, r in ((256, 128, 16), (128, 320, 32), (96, 96, 96)):
        W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f)).to(DEVICE)
        B, A = olora_factors(W, r)
        lin = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).to(DEVICE)
        with torch.no_grad():
            lin[0].weight.copy_(W)
        peft = get_peft_model(lin, LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights="olora"))
        layer = peft.base_model.model[0]
        assert B.device.type == DEVICE
        dB = float((B - layer.lora_B["default"].weight.detach()).abs().max())
        dA = float((A - layer.lora_A["default"].weight.detach()).abs().max())
        worst[f"{out_f}x{in_f} r{r}"] = {"max_abs_diff_B": dB, "max_abs_diff_A": dA}
        assert dB <= 1e-5 and dA <= 1e-5, (out_f, in_f, r, dB, dA)
    record(factors=worst, bound=1e-5)


def test_pissa_and_loftq_factors_on_the_device_equal_peft(record) -> None:
    """pissa (exact SVD) equals PEFT's ``init_lora_weights="pissa"``, and loftq at one round PEFT's own
    ``loftq_init`` (which runs on CUDA only: on the CPU rehearsal its part is recorded as skipped)."""
    from peft import get_peft_model
    from peft.utils.loftq_utils import loftq_init

    from qolora.inits import InitSpec, factor

    W = torch.randn(256, 128, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    lin = torch.nn.Sequential(torch.nn.Linear(128, 256, bias=False)).to(DEVICE)
    with torch.no_grad():
        lin[0].weight.copy_(W)
    layer = get_peft_model(lin, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], init_lora_weights="pissa"))
    layer = layer.base_model.model[0]
    got = factor(W, 16, 2.0, InitSpec("pissa"), lambda x: x, lambda x: x)
    d_pissa = max(
        float((got.B - layer.lora_B["default"].weight.detach()).abs().max()),
        float((got.A - layer.lora_A["default"].weight.detach()).abs().max()),
    )
    assert d_pissa <= 1e-5, d_pissa
    result = {"pissa_max_abs_diff": d_pissa, "bound": 1e-5}
    if DEVICE == "cuda":
        settings = quant.QuantSettings("nf4", 64, False, torch.uint8, torch.float32)  # PEFT's Params4bit defaults
        ours = factor(W, 16, 1.0, InitSpec("loftq"), lambda x: quant.roundtrip(x, settings), lambda x: x)
        _, lora_A, lora_B = loftq_init(W.clone(), num_bits=4, reduced_rank=16, num_iter=1)
        d_loftq = max(float((ours.B - lora_B).abs().max()), float((ours.A - lora_A).abs().max()))
        assert d_loftq <= 1e-5, d_loftq
        result["loftq_max_abs_diff"] = d_loftq
    else:
        result["loftq"] = "skipped: PEFT's loftq_init moves the weight to CUDA"
    record(**result)


def test_kernel_self_check_passes_in_bf16(llama_dir, record) -> None:
    from qolora.quant.check import check_kernel, tolerance

    model = quant.load_quantized(llama_dir, compute_dtype="bfloat16")
    result = check_kernel(model)
    assert result is not None and result.device.startswith(DEVICE) and result.dtype == "bfloat16"
    record(errors=result.errors, tolerance=tolerance(torch.bfloat16), seconds=result.seconds)


def test_init_keeps_settings_and_load_adapter_reproduces_the_logits(llama_dir, tmp_path, record) -> None:
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora")
    model = qolora.get_qolora_model(quant.load_quantized(llama_dir, compute_dtype="bfloat16"), cfg, progress=False)
    layers = [m for m in model.modules() if quant.is_4bit(m)]
    assert all(m.weight.device.type == DEVICE and quant.quant_settings(m).dtype == torch.bfloat16 for m in layers)
    assert model.qolora_states["default"].report.sources() == {"checkpoint": 14}
    perturb_lora_(model, 0.05)  # as after training
    x = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    want = logits(model, x)
    qolora.save_adapter(model, tmp_path / "a")
    got = logits(qolora.load_adapter(tmp_path / "a", progress=False), x)
    record(max_abs_diff=float((got - want).abs().max()), bound="bit-identical")
    assert torch.equal(got, want)


def test_the_optimizer_is_paged_adamw_8bit(chat_model_dir, tmp_path, monkeypatch, record) -> None:
    """On CUDA ``optimizer: auto`` is bitsandbytes' paged AdamW with 8-bit states (CPU: torch's AdamW)."""
    from transformers import TrainerCallback

    from qolora.training import train

    from .conftest import add_trainer_callback, tiny_train_config

    seen = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            states = [s for s in opt.state.values() if s]
            seen.update(
                cls=f"{type(opt).__module__}.{type(opt).__name__}",
                optim_bits=getattr(getattr(opt, "args", None), "optim_bits", None),
                is_paged=getattr(opt, "is_paged", None),
                state_dtypes=sorted({str(t.dtype) for s in states for t in s.values() if torch.is_tensor(t)}),
            )

    add_trainer_callback(monkeypatch, Look())
    cfg = tiny_train_config(chat_model_dir, tmp_path, max_steps=1, save_steps=100, eval_steps=100)
    cfg.adapter.r = cfg.adapter.alpha = 32  # 128 x 32 = 4096 elements: bitsandbytes' smallest 8-bit tensor
    train(cfg)
    record(**seen)
    if DEVICE == "cuda":
        assert seen["cls"] == "bitsandbytes.optim.adamw.AdamW" and seen["optim_bits"] == 8 and seen["is_paged"]
        assert "torch.uint8" in seen["state_dtypes"]  # the moments really are 8-bit
    else:
        assert seen["cls"] == "torch.optim.adamw.AdamW"


def test_chunked_ce_equals_full_ce_in_bf16(record) -> None:
    import torch.nn.functional as F

    from qolora.training.losses import chunked_ce_sum

    g = torch.Generator().manual_seed(0)
    N, H, V = 300, 64, 1000
    h = torch.randn(N, H, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    W = (0.3 * torch.randn(V, H, generator=g)).to(DEVICE, torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[::5] = -100
    full = F.cross_entropy((h @ W.T).float(), y, ignore_index=-100, reduction="sum")
    gh_full, gw_full = torch.autograd.grad(full, (h, W))
    chunked = chunked_ce_sum(h, W, y, chunk=64)
    gh, gw = torch.autograd.grad(chunked, (h, W))
    diffs = {
        "loss_rel": float((chunked - full).abs() / full.abs()),
        "grad_hidden_rel": float((gh.float() - gh_full.float()).abs().max() / gh_full.float().abs().max()),
        "grad_weight_rel": float((gw.float() - gw_full.float()).abs().max() / gw_full.float().abs().max()),
    }
    record(**diffs, bound=2e-2)
    assert all(v <= 2e-2 for v in diffs.values()), diffs


def test_kill_9_then_resume_gives_the_uninterrupted_losses(chat_model_dir, tmp_path, monkeypatch, record) -> None:
    """test_train's kill -9 test: training runs on CUDA whenever there is a GPU."""
    test_train.test_resume_after_kill_9_matches_uninterrupted(chat_model_dir, tmp_path, monkeypatch)
    m = json.loads((tmp_path / "kill" / "run" / "metrics.json").read_text())
    record(losses=[h["loss"] for h in m["history"]], peak_memory=m.get("peak_memory_bytes"))
    if DEVICE == "cuda":
        assert m["peak_memory_bytes"].get("cuda_peak_allocated", 0) > 0  # it trained on the GPU


def test_trained_merged_export_matches_the_model_within_fp16_rounding(base_copy, tmp_path, tokens, record) -> None:
    from qolora.export import export_merged

    # fp32 compute ("auto" is bf16 on CUDA): the bound is then the export's fp16 rounding alone
    model = _trained_adapter(base_copy, tmp_path / "a", compute_dtype="float32")
    assert next(p for p in model.parameters() if not p.requires_grad).device.type == DEVICE
    x = tokens[:1].to(DEVICE)
    want = logits(model, x).cpu()
    export_merged(tmp_path / "a", tmp_path / "m", progress=False)
    (tmp_path / "fresh.py").write_text(FRESH)
    cmd = [sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "m"), str(tmp_path / "l.safetensors")]
    subprocess.run([*cmd, ",".join(map(str, x[0].tolist()))], check=True, capture_output=True, timeout=300)
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "l.safetensors"))["logits"]
    rel = float((got - want).abs().max() / want.abs().max())
    record(max_rel_diff=rel, bound=2e-3)
    assert rel <= 2e-3


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-5), ("bfloat16", 5e-3)])
def test_padding_free_packing_equals_the_unpacked_loss(chat_model_dir, dtype, rel, record) -> None:
    """On the 4-bit QOLoRA model, as training runs it (bf16 bounds its rounding: different shapes)."""
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora")
    model = qolora.get_qolora_model(quant.load_quantized(chat_model_dir, compute_dtype=dtype), cfg, progress=False)
    gaps = packing_matches_one_by_one(model.eval(), rel, crossed=dtype == "float32")
    record(**gaps, bound=rel)


@pytest.mark.parametrize("family", ["Mixtral", "gpt-oss"])
def test_moe_experts_load_in_4bit_and_train_on_the_device(family, tmp_path, record) -> None:
    """Every expert matrix a 4-bit layer on the device (gpt-oss's cut from its fused tensors), the
    4-bit model's logits close to the fp32 one's (bf16 compute on CUDA), and one all-linear step that
    gives every expert adapter a finite gradient."""
    from transformers import AutoModelForCausalLM

    from .conftest import make_tokenizer
    from .model_matrix import FAMILIES, build

    tok = make_tokenizer()
    build(next(f for f in FAMILIES if f.name == family), tok).save_pretrained(tmp_path)
    model = quant.load_quantized(tmp_path)
    experts = [m for n, m in model.named_modules() if ".experts." in n and quant.is_4bit(m)]
    assert experts and all(m.weight.device.type == DEVICE for m in experts)
    assert not [n for n, p in model.named_parameters() if p.ndim == 3]
    ids = torch.randint(3, len(tok), (2, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        got, want = model(input_ids=ids).logits.float(), ref(input_ids=ids).logits
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    peft = qolora.get_qolora_model(
        model, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora"), progress=False
    )
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if ".experts." in n and "lora_" in n]
    hit = sum(g is not None and bool(g.abs().sum() > 0) for g in grads)
    record(experts=len(experts), argmax_agree=agree, loss=float(loss), expert_adapters_with_grad=hit, of=len(grads))
    assert torch.isfinite(loss) and all(g is None or torch.isfinite(g).all() for g in grads)
    assert hit > len(grads) // 2 and agree > 0.5
