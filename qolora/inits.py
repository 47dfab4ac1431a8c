"""The factored inits: OLoRA (iterated or not), QPiSSA and LoftQ, as pure tensor code.

Each one splits a weight W (out, in) into adapter factors B (out, r), A (r, in) and a residual
that the caller stores as the frozen base (quantized once on a 4-bit base):

- ``olora`` (arXiv 2406.01775): B, A from a thin QR of W; with ``iters`` T > 1, the factors are
  refit T − 1 times to what quantizing the residual lost (``refit_orthonormal``), B staying
  orthonormal. T = 1 is plain OLoRA, bit for bit.
- ``pissa`` (QPiSSA, arXiv 2404.02948): the top-r singular triplets, B = U·√(S/s), A = √(S/s)·Vᵀ,
  exactly or by ``torch.svd_lowrank`` with ``svd_niter`` power iterations (PEFT's convention).
- ``loftq`` (arXiv 2310.08659): T rounds of "quantize W − s·B·A, refit B·A to W − dequant" (PEFT's
  ``loftq_init`` order), B, A split as in PiSSA. The base is then the residual of the *previous*
  round's factors (none at T = 1: plain W), not of the adapter's own: ``Factored.base_B``.

No I/O, no PEFT, no bitsandbytes: quantization comes in as a ``roundtrip`` callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .choices import FACTORED_INITS, INITS
from .olora import check_rank, olora_factors, subtract_lowrank_

Roundtrip = Callable[[torch.Tensor], torch.Tensor]  # X -> dequant(quant(X)), float32, as the base would hold it
Cast = Callable[[torch.Tensor], torch.Tensor]  # a factor -> its value in the adapter dtype (returned in float32)
SVD_SEED = 0  # torch.svd_lowrank's random sketch, reseeded per layer: the same init on every run and rank


@dataclass(frozen=True)
class InitSpec:
    """Which init, and its knobs. ``iters``: T quantization rounds (olora, loftq); ``svd_niter``:
    randomized SVD with this many power iterations (pissa only; None = exact SVD)."""

    method: str = "olora"
    iters: int = 1
    svd_niter: int | None = None

    def __post_init__(self) -> None:
        if self.method not in INITS:
            raise ValueError(f"init: expected one of {', '.join(INITS)}, got {self.method!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"init_iters: must be an integer >= 1, got {self.iters!r}")
        if self.iters > 1 and self.method not in ("olora", "loftq"):
            raise ValueError(f"init_iters: {self.iters} rounds are for olora and loftq; {self.method} has none")
        if self.svd_niter is not None:
            if self.method != "pissa":
                raise ValueError(f"svd_niter: the randomized SVD is pissa's; {self.method} does not take it")
            if isinstance(self.svd_niter, bool) or not isinstance(self.svd_niter, int) or self.svd_niter < 0:
                raise ValueError(f"svd_niter: must be an integer >= 0, got {self.svd_niter!r}")

    @property
    def factored(self) -> bool:
        """True when the adapter starts from factors of W (anything but plain LoRA's B = 0)."""
        return self.method in FACTORED_INITS

    @property
    def peft_name(self) -> str | bool:
        """PEFT's ``init_lora_weights`` value for this init (``True`` for plain LoRA)."""
        if self.method == "lora":
            return True
        if self.method == "pissa" and self.svd_niter is not None:
            return f"pissa_niter_{self.svd_niter}"
        return self.method

    @property
    def label(self) -> str:
        """A short name for reports and run folders: ``olora``, ``olora-t4``, ``pissa-niter4``."""
        if self.iters > 1:
            return f"{self.method}-t{self.iters}"
        return f"pissa-niter{self.svd_niter}" if self.svd_niter is not None else self.method


@dataclass
class Factored:
    """One layer's split. ``B``, ``A``: the adapter's initial factors (float32, already cast);
    ``base_B``, ``base_A``: the factors the stored residual W − s·base_B·base_A was taken with
    (the same tensors for olora and pissa; None: the base is W itself)."""

    B: torch.Tensor
    A: torch.Tensor
    base_B: torch.Tensor | None
    base_A: torch.Tensor | None


def pissa_factors(W: torch.Tensor, r: int, scale: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's factors (arXiv 2404.02948) with PEFT's scaling: s·B·A is W's top-r SVD part.

    Args:
        W: (out, in) float32. r: rank. scale: the LoRA scale s.
        niter: None for the exact SVD (``torch.linalg.svd``), else ``torch.svd_lowrank`` with
            this many subspace iterations and a sketch of r columns, as PEFT's ``pissa_niter_K``;
            its Gaussian sketch comes from a generator seeded with ``SVD_SEED``.

    Returns:
        B: (out, r) = U_r·√(S_r/s), A: (r, in) = √(S_r/s)·V_rᵀ, float32.
    """
    check_rank(r, tuple(W.shape))
    W32 = W.detach().to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        devices = [W32.device] if W32.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(SVD_SEED)
            U, S, V = torch.svd_lowrank(W32, q=r, niter=niter)
        Vh = V.T
    return _sqrt_split(U, S / scale, Vh)


def _sqrt_split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = S.clamp_min(0).sqrt()
    B, A = U * root, root[:, None] * Vh
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise ValueError("weight has NaN or Inf entries; the SVD needs a finite weight")
    return B.contiguous(), A.contiguous()


def lowrank_fit(E: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r s·B·A ≈ E (Eckart–Young, exact SVD), split as PiSSA's: LoftQ's refit.

    With s = 1 these are PEFT's ``_low_rank_decomposition`` L (= B) and R (= A)."""
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    return _sqrt_split(U[:, :r], S[:r] / scale, Vh[:r])


def refit_orthonormal(E: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterated OLoRA's refit: one block power step on E from the current B, then A = Bᵀ·E / s.

    Args:
        E: (out, in) float32, W − dequant(base): what the adapter has to supply.
        B: (out, r) the current orthonormal factor, the warm start.

    Returns:
        B': (out, r) orthonormal, the QR of E·(Eᵀ·B); A': (r, in) = B'ᵀ·E / s, the least-squares A
        for that B' (so s·B'·A' is E's projection onto span(B')).

    Note:
        A range-finder sketch E·Ω with Ω = Eᵀ·B: the subspace the adapter already spans is the best
        start, so one step reaches what a full SVD refit gives (0.916x of plain QLoRA's weight error
        either way on the demo model at T = 4, r = 16) at O(out·in·r) instead of an SVD's
        O(out·in·min(out, in)). B stays orthonormal (Householder QR), which is OLoRA's property.
    """
    Y = E @ (E.T @ B)  # (out, r)
    Bn, _ = torch.linalg.qr(Y, mode="reduced")
    return Bn.contiguous(), (Bn.T @ E).div_(scale).contiguous()


def residual(W: torch.Tensor, B: torch.Tensor | None, A: torch.Tensor | None, scale: float) -> torch.Tensor:
    """A fresh W − s·B·A (or a copy of W), computed as ``subtract_lowrank_`` computes the stored base."""
    out = W.clone()
    return out if B is None else subtract_lowrank_(out, B, A, scale)


def factor(W: torch.Tensor, r: int, scale: float, spec: InitSpec, roundtrip: Roundtrip, cast: Cast) -> Factored:
    """Split one weight by ``spec``; W is not modified.

    Args:
        W: (out, in) float32, the original weight.
        roundtrip: what the base would hold for a residual (NF4 quantize + dequantize on a 4-bit
            base). Called T − 1 times for olora, T times for loftq, never for pissa.
        cast: rounds a factor to the adapter dtype; every residual is taken from cast factors,
            so the one the caller stores is exactly base + s·B·A's (docs/design.md, invariant 2).

    Raises:
        ValueError: a bad rank or a non-finite weight.
    """
    check_rank(r, tuple(W.shape))
    if spec.method == "olora":
        B, A = olora_factors(W, r)
        for _ in range(spec.iters - 1):
            E = W - roundtrip(residual(W, cast(B), cast(A), scale))
            B, A = refit_orthonormal(E, B, scale)
            del E
        B, A = cast(B), cast(A)
        return Factored(B, A, B, A)
    if spec.method == "pissa":
        B, A = pissa_factors(W, r, scale, spec.svd_niter)
        B, A = cast(B), cast(A)
        return Factored(B, A, B, A)
    if spec.method == "loftq":
        base_B = base_A = None
        for t in range(spec.iters):
            E = W - roundtrip(residual(W, base_B, base_A, scale))
            B, A = lowrank_fit(E, r, scale)
            B, A = cast(B), cast(A)
            del E
            if t + 1 < spec.iters:
                base_B, base_A = B, A
        return Factored(B, A, base_B, base_A)
    raise ValueError(f"init {spec.method!r} has no factors")
