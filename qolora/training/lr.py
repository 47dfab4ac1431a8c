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
# pissa and loftq r16 from benchmarks/init_quality.py grid (same settings; BENCHMARKS.md, "Fine-tune
# quality per init"): pissa 3e-4 (1.266; 1e-4: 1.505), loftq T=4 1e-3 (1.245; 3e-3: 1.248), both then
# over 3 seeds (1.281 ± 0.013, 1.250 ± 0.006). Their r64 entries are provisional, not swept: one run
# each at the r16 lr (init_quality.py r64, seed 0) gave pissa 1.238 and loftq T=4 1.240, level with
# lora r64's 1.237, so both keep their r16 lr. (olora r64 at 3e-4 gave 1.466: its r64 entry is open.)
# An iterated olora keeps olora's entries (the same B, A scale).
AUTO_LR: dict[tuple[str, int], float] = {
    ("olora", 16): 3e-4,
    ("olora", 64): 1e-4,
    ("pissa", 16): 3e-4,
    ("pissa", 64): 3e-4,
    ("loftq", 16): 1e-3,
    ("loftq", 64): 1e-3,
    ("lora", 16): 3e-3,
    ("lora", 64): 3e-3,
}
PROVISIONAL = frozenset({("olora", 64), ("lora", 64), ("pissa", 64), ("loftq", 64)})


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


PREFERENCE_LR_DIVISOR = 10


def resolve_lr(lr: float | str, init: str, r: int, alpha: float, method: str = "sft") -> tuple[float, str]:
    """The lr to train with, and why. An explicit number wins; "auto" reads ``AUTO_LR``.

    Away from alpha = r the table value is divided by the LoRA scale alpha/r: with Adam the
    per-step change of s·B·A grows in proportion to s, for either init. The table was swept for
    SFT; a preference method (``method`` not sft) takes a tenth of it (provisional: BENCHMARKS.md
    "Preference tuning" has the DPO sweep).
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
    if method != "sft":
        value /= PREFERENCE_LR_DIVISOR
        why += f", divided by {PREFERENCE_LR_DIVISOR} for {method} (provisional: the table was swept for sft)"
    return float(f"{value:.3g}"), why
