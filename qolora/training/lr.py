"""``train.lr: auto``: a learning rate per adapter init and rank, from measured sweeps.

OLoRA's A = R[:r] starts at the scale of W while LoRA's B starts at zero, so the same Adam lr
moves an OLoRA adapter much further: its best lr is lower (about 18x lower than LoRA's in Lee
et al., arXiv 2602.04998). The table is for alpha = r (LoRA scale 1), from ``qolora sweep`` on
the 4-bit demo model where measured.
"""

from __future__ import annotations

import math

# (init, rank) -> lr, from benchmarks/lr_sweep.py on the 4-bit demo model (chatterbot, 40 steps x 8,
# token-weighted held-out loss, seed 0; BENCHMARKS.md, "OLoRA at its own best learning rate"):
# olora r16: 3e-4 (1.317; 1e-4: 1.380, 1e-3: 1.573); lora r16: 3e-3 (1.241; 1e-3: 1.360, 1e-2: 1.512,
# 3e-4: 1.746). LoRA's best is 10x OLoRA's here (Lee et al. report about 18x). r64 was not swept
# (cut for time): olora r64 one grid step below r16, as OLoRA was unstable at 1e-3 and r64 (eval 3.45
# at step 10); lora r64 as r16, since LoRA's B = 0 start does not grow with r. Both r64 are provisional.
# pissa and loftq are provisional, not swept: PiSSA's factors start at the scale of W's top singular
# values, as OLoRA's A does, so it takes OLoRA's entries; LoftQ's fit only what quantization lost
# (singular values ~1e-2 of PiSSA's on the demo model), so it starts near LoRA's B = 0 and takes LoRA's.
# An iterated olora keeps olora's entries (the same B, A scale).
AUTO_LR: dict[tuple[str, int], float] = {
    ("olora", 16): 3e-4,
    ("olora", 64): 1e-4,
    ("pissa", 16): 3e-4,
    ("pissa", 64): 1e-4,
    ("loftq", 16): 3e-3,
    ("loftq", 64): 3e-3,
    ("lora", 16): 3e-3,
    ("lora", 64): 3e-3,
}
PROVISIONAL = frozenset({("olora", 64), ("lora", 64), ("pissa", 16), ("pissa", 64), ("loftq", 16), ("loftq", 64)})


def _by_rank(init: str, r: int) -> tuple[float, str, set[int]]:
    """The table lr for ``r``, why, and the table ranks it was read from."""
    ranks = sorted(k for i, k in AUTO_LR if i == init)
    if r <= ranks[0] or r >= ranks[-1]:
        near = ranks[0] if r <= ranks[0] else ranks[-1]
        why = f"the {init} r{near} entry of AUTO_LR" + ("" if near == r else f" (nearest rank to {r})")
        return AUTO_LR[(init, near)], why, {near}
    lo = max(k for k in ranks if k <= r)
    hi = min(k for k in ranks if k >= r)
    if lo == hi:
        return AUTO_LR[(init, r)], f"the {init} r{r} entry of AUTO_LR", {r}
    t = (math.log(r) - math.log(lo)) / (math.log(hi) - math.log(lo))
    lr = math.exp((1 - t) * math.log(AUTO_LR[(init, lo)]) + t * math.log(AUTO_LR[(init, hi)]))
    return lr, f"log-interpolated between the {init} r{lo} and r{hi} entries of AUTO_LR", {lo, hi}


def resolve_lr(lr: float | str, init: str, r: int, alpha: float) -> tuple[float, str]:
    """The lr to train with, and why. An explicit number wins; "auto" reads ``AUTO_LR``.

    Away from alpha = r the table value is divided by the LoRA scale alpha/r: with Adam the
    per-step change of s·B·A grows in proportion to s, for either init.
    """
    if lr != "auto":
        return float(lr), "set explicitly"
    value, why, used = _by_rank(init, r)
    if any((init, k) in PROVISIONAL for k in used):
        why += " (provisional: not measured by a sweep)"
    scale = alpha / r
    if not math.isclose(scale, 1.0):
        value /= scale
        why += f", divided by the LoRA scale alpha/r = {scale:g} (the table is for alpha = r)"
    return float(f"{value:.3g}"), why
