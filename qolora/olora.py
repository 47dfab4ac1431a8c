"""OLoRA factors: orthonormal low-rank adaptation (Büyükakyüz, arXiv 2406.01775).

Pure tensor code: no I/O, no PEFT, no bitsandbytes.
"""

from __future__ import annotations

import torch


def check_rank(r: int, shape: tuple[int, ...], name: str = "weight") -> None:
    """Raise ValueError unless 1 <= r <= min(out, in) for a (out, in) weight."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{name}: rank r must be a positive integer, got {r!r}")
    if len(shape) != 2:
        raise ValueError(f"{name}: OLoRA needs a 2-D (out, in) weight, got shape {tuple(shape)}")
    if r > min(shape):
        raise ValueError(
            f"{name}: rank r={r} exceeds min(out, in)={min(shape)} of its {shape[0]}x{shape[1]} weight; "
            f"choose r <= {min(shape)}"
        )


def olora_factors(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The OLoRA factors of ``W``: B = Q[:, :r] and A = R[:r] of W = QR.

    Runs QR on the first r columns only, ``W[:, :r] = Q_r R_rr``, then ``A = Q_rᵀ W``.
    Householder QR builds its first r reflectors from the first r columns alone, so Q_r is
    the first r columns of the full factorization and Q_rᵀ W is its first r rows of R: the
    result equals PEFT's ``init_lora_weights="olora"`` (a full ``torch.linalg.qr(W)``) at
    O(out·in·r) cost instead of O(out·in·min(out, in)).

    Args:
        W: (out, in) weight, any float dtype, on any device.
        r: rank, 1 <= r <= min(out, in).

    Returns:
        B: (out, r) float32 with orthonormal columns (also when the leading columns are
           rank-deficient: Householder Q is orthonormal by construction).
        A: (r, in) float32.

    Raises:
        ValueError: for a bad rank or a weight with NaN or Inf entries.

    Note:
        QR runs in float32 whatever W's dtype: bf16/fp16 QR is unsupported or inaccurate, and
        the factors are what the adapter trains from.
    """
    check_rank(r, tuple(W.shape))
    W32 = W.detach().to(torch.float32)
    B, _ = torch.linalg.qr(W32[:, :r], mode="reduced")  # (out, r)
    A = B.T @ W32  # (r, in)
    # Note: a NaN or Inf anywhere in W reaches A (inf·0 and nan·x are NaN), so checking the
    # small factors costs O((out + in)·r) instead of a full pass over W.
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise ValueError("weight has NaN or Inf entries; OLoRA needs a finite weight")
    return B.contiguous(), A.contiguous()


def balance_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 component, B[:, j]·c_j and A[j]/c_j, so that both have about equal norm.

    c_j = 2^round(log2 √(‖A_j‖ / ‖B_j‖)): a power of two, so both scalings are exact in binary
    floating point (no overflow or subnormals at these magnitudes) and B·A is bit-identical; the
    residual, and so the 4-bit base, does not change. Among all c with the same product this one
    (up to the power-of-two rounding) minimises ‖B_j‖ + ‖A_j‖, which sets how far one Adam step
    moves B·A: OLoRA's A = R[:r] sits at the scale of W (row norms 1.4-55 in the SmolLM2-135M layers checked, against
    B's unit columns), so the same lr moves some layers' product tens of times further than
    others'.

    Args:
        B: (out, r) and A: (r, in), any float dtype; components with a zero factor stay as they are.

    Returns:
        (B·c, A/c) in the input dtypes.
    """
    b = torch.linalg.vector_norm(B.float(), dim=0)
    a = torch.linalg.vector_norm(A.float(), dim=1)
    ok = (a > 0) & (b > 0)
    ratio = torch.where(ok, a / torch.where(ok, b, 1.0), 1.0)
    c = torch.exp2(torch.round(0.5 * torch.log2(ratio)))
    return (B * c.to(B.dtype)).contiguous(), (A / c.to(A.dtype)[:, None]).contiguous()


def subtract_lowrank_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """W ← W − scale·B·A, in place, in W's dtype (callers pass float32).

    Args:
        W: (out, in) float32, overwritten with the residual.
        B: (out, r) and A: (r, in), exactly as stored in the adapter (any float dtype).

    Note:
        The residual is computed from the factors *as stored* (after any cast to the adapter
        dtype), so base + scale·B·A reproduces W up to the base's own rounding (docs/design.md,
        invariant 2). Casting after computing the residual would bake the cast error in.
    """
    return W.addmm_(B.to(W.dtype), A.to(W.dtype), alpha=-float(scale))
