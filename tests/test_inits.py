"""pissa, loftq and iterated olora: PEFT parity, the base they leave, exact reload, exports, errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qolora
from qolora import quant
from qolora.config import ConfigError, load_config
from qolora.export import export_lora, export_merged
from qolora.initialize import iter_targets
from qolora.inits import InitSpec, pissa_factors, refit_orthonormal
from qolora.training.grid import parse_init

from .conftest import assert_same_state, logits, perturb_lora_


def _cfg(r: int = 8, alpha: float | None = None, init: object = True) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha or r, target_modules="all-linear", init_lora_weights=init)


def _fp32(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _layers(model) -> dict[str, torch.nn.Module]:
    return {t.name: t.lora for t in iter_targets(model, "default")}


def _base_bits(model) -> dict[str, list[torch.Tensor]]:
    return {n: [t for _, t in quant.state_tensors(m.get_base_layer())[1]] for n, m in _layers(model).items()}


def test_pissa_equals_peft_pissa_on_the_same_fp32_weight(llama_dir) -> None:
    """Factors and residual base equal PEFT's ``init_lora_weights="pissa"`` (exact SVD), at LoRA scale 2."""
    ours = qolora.get_qolora_model(_fp32(llama_dir), _cfg(alpha=16, init="pissa"), progress=False)
    assert_same_state(ours, get_peft_model(_fp32(llama_dir), _cfg(alpha=16, init="pissa")), n_lora=28)
    assert ours.qolora_states["default"].meta.init == "pissa"


def test_pissa_niter_is_seeded_leaves_the_global_rng_alone_and_is_near_the_exact_svd() -> None:
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
    V, _ = torch.linalg.qr(torch.randn(256, 128, generator=g))
    W = (U * torch.logspace(1, -2, 128)) @ V.T  # a decaying spectrum, as in trained weights
    state = torch.get_rng_state()
    B1, A1 = pissa_factors(W, 8, 2.0, niter=4)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    B2, A2 = pissa_factors(W, 8, 2.0, niter=4)
    assert torch.equal(B1, B2) and torch.equal(A1, A2)
    Be, Ae = pissa_factors(W, 8, 2.0)
    exact, fast = (W - 2.0 * Be @ Ae).norm(), (W - 2.0 * B1 @ A1).norm()
    assert exact <= fast <= 1.05 * exact  # a sketch of r columns, no oversampling (PEFT's q = r): 2% here


def test_loftq_one_round_equals_peft_loftq_and_keeps_the_plain_qlora_base(llama_dir) -> None:
    """PEFT's ``loftq_init`` at one round: NF4 of W without double quantization (its ``Params4bit(...,
    compress_statistics=False)``), then ``_low_rank_decomposition`` of what it lost. PEFT's own function
    runs on CUDA only (tests/test_gpu.py calls it); here its two steps are called on the same weight."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    model = qolora.get_qolora_model(
        quant.load_quantized(llama_dir, double_quant=False), _cfg(), init="loftq", progress=False
    )
    plain = _base_bits(qolora.get_qolora_model(quant.load_quantized(llama_dir, double_quant=False), _cfg()))
    sd = load_file(str(llama_dir / "model.safetensors"))
    for name, lora in _layers(model).items():
        W = sd[f"{name}.weight"].float()
        q = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        ref = _low_rank_decomposition(W - bnb.functional.dequantize_4bit(q.data, q.quant_state), reduced_rank=8)
        assert (lora.lora_B["default"].weight - ref["L"][:, :8]).abs().max() <= 1e-5, name
        assert (lora.lora_A["default"].weight - ref["R"][:8]).abs().max() <= 1e-5, name
        assert all(torch.equal(a, b) for a, b in zip(_base_bits(model)[name], plain[name])), name


def test_iterated_olora_one_round_is_olora_and_more_rounds_stay_orthonormal_and_lower_the_error(
    outlier_llama_dir,
) -> None:
    def make(**kw):
        return qolora.get_qolora_model(
            quant.load_quantized(outlier_llama_dir), _cfg(init="olora"), progress=False, **kw
        )

    plain, one = make(), make(init="olora", init_iters=1)
    assert all(torch.equal(a, b) for n in _base_bits(plain) for a, b in zip(_base_bits(plain)[n], _base_bits(one)[n]))
    for (b1, a1), (b2, a2) in zip(
        plain.qolora_states["default"].factors.values(), one.qolora_states["default"].factors.values()
    ):
        assert torch.equal(b1, b2) and torch.equal(a1, a2)
    ratios = [plain.qolora_states["default"].report.mean_ratio()]
    sd = load_file(str(outlier_llama_dir / "model.safetensors"))
    for t in (2, 4):
        model = make(init_iters=t)
        state = model.qolora_states["default"]
        ratios.append(state.report.mean_ratio())
        assert state.report.init == f"olora-t{t}" and state.meta.init_iters == t
        for name, lora in _layers(model).items():
            B, A = state.factors[name]
            assert (B.T @ B - torch.eye(8)).abs().max() <= 1e-5, name  # OLoRA's orthonormal B, kept
            base = lora.get_base_layer()
            # the base holds the residual of the adapter's own factors, quantized once
            want = quant.roundtrip(sd[f"{name}.weight"].float() - B @ A, quant.quant_settings(base))
            assert torch.equal(quant.dequantize(base), want), name
    assert ratios[0] > ratios[1] > ratios[2], ratios


def test_refit_keeps_what_the_adapter_spans_and_fits_it_least_squares() -> None:
    g = torch.Generator().manual_seed(2)
    E = torch.randn(64, 128, generator=g)
    B, _ = torch.linalg.qr(torch.randn(64, 4, generator=g))
    B1, A1 = refit_orthonormal(E, B, 0.5)
    assert (B1.T @ B1 - torch.eye(4)).abs().max() <= 1e-5
    assert (0.5 * B1 @ A1 - B1 @ B1.T @ E).abs().max() <= 1e-5  # the projection of E onto span(B1)
    assert (E - 0.5 * B1 @ A1).norm() < (E - B @ B.T @ E).norm()  # a power step towards E's top subspace


@pytest.mark.parametrize(
    "kw",
    [
        {"init": "pissa"},
        {"init": "pissa", "svd_niter": 2},
        {"init": "loftq"},
        {"init": "loftq", "init_iters": 2},
        {"init": "olora", "init_iters": 2},
    ],
)
def test_every_init_reloads_bit_identically_with_no_factorization(base_copy, tmp_path, tokens, monkeypatch, kw) -> None:
    model = perturb_lora_(
        qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(alpha=16), progress=False, **kw)
    )
    want = logits(model, tokens)
    out = qolora.save_adapter(model, tmp_path / "a")
    meta = json.loads((out / "qolora.json").read_text())["init"]
    assert (meta["method"], meta["iters"], meta["svd_niter"]) == (
        kw["init"],
        kw.get("init_iters", 1),
        kw.get("svd_niter"),
    )
    keys = load_file(str(out / "initial_factors.safetensors")).keys()
    assert any(k.endswith(".Bbase") for k in keys) == (kw["init"] == "loftq" and kw.get("init_iters", 1) > 1)

    def refuse(*a, **k):
        raise AssertionError("load_adapter factored a weight")

    for mod, fn in ((torch.linalg, "qr"), (torch.linalg, "svd"), (torch, "svd_lowrank"), (torch, "load")):
        monkeypatch.setattr(mod, fn, refuse)
    assert torch.equal(logits(qolora.load_adapter(out, progress=False), tokens), want)


@pytest.mark.parametrize("kw", [{"init": "pissa"}, {"init": "loftq", "init_iters": 2}])
def test_both_exports_of_pissa_and_loftq(base_copy, tmp_path, tokens, kw) -> None:
    """trained merge = the 4-bit model (fp32 export, 1e-4); the portable rank-2r LoRA on the original
    base = the original merge W + s·(B·A − B0·A0)."""
    model = perturb_lora_(
        qolora.get_qolora_model(quant.load_quantized(base_copy), _cfg(alpha=16), progress=False, **kw), 0.05
    )
    qolora.save_adapter(model, tmp_path / "a")
    x = tokens[:1]
    export_merged(tmp_path / "a", tmp_path / "m", dtype="float32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert (logits(merged, x) - logits(model, x)).abs().max() <= 1e-4
    assert f"tags: [qolora, {kw['init']}, lora, merged]" in (tmp_path / "m" / "README.md").read_text()
    export_merged(tmp_path / "a", tmp_path / "orig", mode="original", dtype="float32", progress=False)
    export_lora(tmp_path / "a", tmp_path / "lora")
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_copy), tmp_path / "lora")
    orig = AutoModelForCausalLM.from_pretrained(tmp_path / "orig", dtype=torch.float32)
    assert (logits(on_original, x) - logits(orig, x)).abs().max() <= 1e-4


def test_pissa_and_loftq_beat_plain_qlora_on_outlier_weights(outlier_llama_dir) -> None:
    for kw in ({"init": "pissa"}, {"init": "loftq", "init_iters": 3}):
        model = qolora.get_qolora_model(quant.load_quantized(outlier_llama_dir), _cfg(), progress=False, **kw)
        report = model.qolora_states["default"].report
        assert all(x.rel_err < x.qlora_rel_err for x in report.layers), kw
        assert report.mean_ratio() < 0.8, (kw, report.mean_ratio())


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"init": "corda"}, "init: expected one of olora, pissa, loftq, lora, got 'corda'"),
        ({"init": "olora", "init_iters": 0}, "init_iters: must be an integer >= 1, got 0"),
        ({"init": "pissa", "init_iters": 2}, "init_iters: 2 rounds are for olora and loftq; pissa has none"),
        ({"init": "olora", "svd_niter": 2}, "svd_niter: the randomized SVD is pissa's; olora does not take it"),
        ({"init": "pissa", "svd_niter": -1}, "svd_niter: must be an integer >= 0, got -1"),
    ],
)
def test_bad_init_values_are_one_line(llama_dir, kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(), progress=False, **kw)


def test_rounds_on_an_unquantized_base_and_a_rank_above_a_layer_are_refused(llama_dir) -> None:
    for kw in ({"init": "loftq"}, {"init": "olora", "init_iters": 2}):
        with pytest.raises(ValueError, match="refit to what 4-bit quantization loses, and this base is not quantized"):
            qolora.get_qolora_model(_fp32(llama_dir), _cfg(), progress=False, **kw)
    with pytest.raises(ValueError, match="adapter.r: rank 65 exceeds min"):
        qolora.get_qolora_model(quant.load_quantized(llama_dir), _cfg(r=65), init="pissa", progress=False)


def test_config_and_grid_name_the_field(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: {train: t.jsonl}\n")
    for overrides, msg in (
        (["adapter.init_iters=0"], "adapter.init_iters: must be an integer >= 1, got 0"),
        (["adapter.init=olora", "adapter.svd_niter=3"], "adapter.svd_niter: the randomized SVD is pissa's"),
        (["adapter.init=loftq", "quant.type=none"], "adapter.init: loftq with 1 round(s) refits"),
    ):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            load_config(cfg, overrides)
    ok = load_config(cfg, ["adapter.init=pissa", "adapter.svd_niter=4"])
    assert (ok.adapter.init, ok.adapter.svd_niter) == ("pissa", 4)
    assert parse_init("loftq-t4") == InitSpec("loftq", 4) and parse_init("pissa-niter2") == InitSpec("pissa", 1, 2)
    assert parse_init("olora-t4").label == "olora-t4" and parse_init("lora").peft_name is True
