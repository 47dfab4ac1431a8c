"""olora_factors: equals PEFT's full QR, orthonormal, robust, and refuses bad input."""

from __future__ import annotations

import pytest
import torch

from qolora.olora import olora_factors, subtract_lowrank_


@pytest.mark.parametrize("shape,r", [((96, 64), 8), ((64, 160), 16), ((50, 50), 50), ((128, 32), 1)])
def test_thin_qr_equals_peft_full_qr(shape: tuple[int, int], r: int) -> None:
    W = torch.randn(*shape)
    B, A = olora_factors(W, r)
    Q, R = torch.linalg.qr(W)  # what PEFT's init_lora_weights="olora" runs
    assert (B - Q[:, :r]).abs().max() <= 1e-5
    assert (A - R[:r]).abs().max() <= 1e-5
    assert B.dtype == A.dtype == torch.float32


def test_factors_are_orthonormal_and_reconstruct_projection() -> None:
    W = torch.randn(200, 120, dtype=torch.float64).float()
    B, A = olora_factors(W, 24)
    assert torch.allclose(B.T @ B, torch.eye(24), atol=1e-5)
    assert torch.allclose(B @ A, B @ B.T @ W, atol=1e-4)
    assert torch.allclose((B @ A)[:, :24], W[:, :24], atol=1e-4)  # first r columns are captured exactly


def test_rank_deficient_leading_columns_stay_orthonormal() -> None:
    W = torch.randn(64, 48)
    W[:, 1] = 2 * W[:, 0]  # dependent
    W[:, 2] = 0.0  # zero column
    W[:, 3] = W[:, 0] - W[:, 1] * 0.5  # exactly zero as well
    B, A = olora_factors(W, 6)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    assert torch.allclose(B.T @ B, torch.eye(6), atol=1e-5)


def test_bf16_input_is_factored_in_fp32() -> None:
    W = torch.randn(64, 64).bfloat16()
    B, A = olora_factors(W, 4)
    Q, R = torch.linalg.qr(W.float())
    assert B.dtype == torch.float32
    assert (B - Q[:, :4]).abs().max() <= 1e-5


@pytest.mark.parametrize("r,msg", [(0, "positive integer"), (65, "exceeds min"), (2.5, "positive integer")])
def test_bad_rank_is_refused(r: object, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        olora_factors(torch.randn(64, 80), r)  # type: ignore[arg-type]


def test_non_finite_weight_is_refused() -> None:
    W = torch.randn(32, 32)
    W[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        olora_factors(W, 4)


def test_residual_uses_stored_factors() -> None:
    W = torch.randn(64, 64)
    B, A = olora_factors(W, 8)
    Bs, As = B.bfloat16(), A.bfloat16()  # as stored in a bf16 adapter
    res = subtract_lowrank_(W.clone(), Bs, As, 2.0)
    rebuilt = res + 2.0 * (Bs.float() @ As.float())
    assert (rebuilt - W).abs().max() <= 1e-5
    # Computing the residual from the fp32 factors and casting them afterwards is off by the cast.
    wrong = subtract_lowrank_(W.clone(), B, A, 2.0) + 2.0 * (Bs.float() @ As.float())
    assert (wrong - W).abs().max() > 1e-4


def test_balance_factors_keeps_the_product_bit_identical_and_evens_the_norms() -> None:
    from qolora.olora import balance_factors

    W = torch.randn(96, 64) * torch.logspace(0, 2, 64)  # columns from 1 to 100: A's rows far above B's unit columns
    B, A = olora_factors(W, 8)
    Bb, Ab = balance_factors(B, A)
    assert torch.equal(Bb @ Ab, B @ A)  # power-of-two scaling: exact
    b, a = Bb.norm(dim=0), Ab.norm(dim=1)
    assert ((a / b).log2().abs() <= 1.0 + 1e-6).all()  # equal up to the power-of-two rounding (factor 2 in ratio)
    assert (A.norm(dim=1) > 4).all()  # it did rescale
    # a zero component is left alone, and bf16 factors stay bf16 with the same exact product
    A[3] = 0
    Bz, Az = balance_factors(B.bfloat16(), A.bfloat16())
    assert Bz.dtype == Az.dtype == torch.bfloat16
    assert torch.equal(Bz[:, 3], B.bfloat16()[:, 3])
    assert torch.equal(Bz.float() @ Az.float(), B.bfloat16().float() @ A.bfloat16().float())
