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
