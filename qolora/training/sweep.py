"""``qolora sweep``: the same short training per (init, rank, lr, seed); the best lr per init and rank.

Every run of one seed sees the same data order. Losses are the held-out set's token-weighted
cross-entropy (QoloraTrainer's eval loss, as ``qolora eval``). The runs go through the grid runner
(``grid.py``): finished ones are reused, an interrupted one resumes, and one the divergence guard
stops counts as diverged.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any

from .._io import write_json_atomic
from ..config import Config, ConfigError, dump_config
from ..files import RUN_CONFIG_FILE
from .grid import check_inits, diverged, run_grid, save_panels, two_panels, variant

logger = logging.getLogger(__name__)


def parse_list(text: str, kind: type, flag: str) -> list[Any]:
    """``"3e-5,1e-4"`` -> ``[3e-05, 0.0001]``; one error line naming the flag and the bad item."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{flag}: expected a comma-separated list, got {text!r}")
    out = []
    for t in items:
        try:
            out.append(kind(float(t)) if kind is int and float(t).is_integer() else kind(t))
        except ValueError:
            raise ConfigError(f"{flag}: {t!r} is not a {kind.__name__}") from None
    return out


def run_name(init: str, r: int, lr: float, seed: int) -> str:
    return f"{init}-r{r}-lr{lr:g}-s{seed}"


def eval_every(steps: int, wanted: int) -> int:
    """The largest eval interval <= ``wanted`` that divides ``steps``, so the last step is evaluated."""
    return max(d for d in range(1, min(wanted, steps) + 1) if steps % d == 0)


def _final(m: dict[str, Any]) -> float | None:
    ev = m.get("eval") or []
    loss = ev[-1]["eval_loss"] if ev else None
    return loss if loss is not None and math.isfinite(loss) else None


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per (init, rank): final loss by lr (mean, min, max over seeds) and the best lr.

    A run whose loss went to nan/inf counts as worse than any finished one.
    """
    groups: dict[str, dict[float, list[float]]] = {}
    for m in runs.values():
        key = f"{m['init']}-r{m['r']}"
        loss = m["final_eval_loss"]
        groups.setdefault(key, {}).setdefault(m["lr"], []).append(math.inf if loss is None else loss)
    by_lr, best = {}, {}
    for key, per in groups.items():
        rows = []
        for lr in sorted(per):
            v = per[lr]
            fin = [x for x in v if math.isfinite(x)]
            rows.append(
                {
                    "lr": lr,
                    "mean": statistics.fmean(v) if len(fin) == len(v) else None,
                    "min": min(fin) if fin else None,
                    "max": max(fin) if len(fin) == len(v) else None,
                    "seeds": len(v),
                    "diverged": len(v) - len(fin),
                }
            )
        by_lr[key] = rows
        ok = [row for row in rows if row["mean"] is not None]
        if ok:
            b = min(ok, key=lambda row: row["mean"])
            lrs = [row["lr"] for row in rows]
            best[key] = {
                "lr": b["lr"],
                "final_eval_loss_mean": b["mean"],
                "min": b["min"],
                "max": b["max"],
                "seeds": b["seeds"],
                "at_grid_edge": len(lrs) > 1 and b["lr"] in (lrs[0], lrs[-1]),
            }
    return {"by_lr": by_lr, "best": best}


def plot(summary: dict[str, Any], path: Path) -> None:
    fig, a, b = two_panels()
    for key, rows in summary["by_lr"].items():
        ok = [row for row in rows if row["mean"] is not None]
        x = [row["lr"] for row in ok]
        line = a.plot(x, [row["mean"] for row in ok], "o-", label=key)[0]
        a.fill_between(x, [row["min"] for row in ok], [row["max"] for row in ok], color=line.get_color(), alpha=0.2)
        best, label = summary["best"].get(key), f"{key} lr {summary['best'].get(key, {}).get('lr', 0):g}"
        for m in summary["runs"].values():
            if best and f"{m['init']}-r{m['r']}" == key and m["lr"] == best["lr"]:
                ev = m["eval"]
                b.plot(
                    [e["step"] for e in ev],
                    [e["eval_loss"] for e in ev],
                    "o-",
                    color=line.get_color(),
                    alpha=0.7,
                    label=label,
                )
                label = None  # one legend entry per init and rank
    a.set_xscale("log")
    a.set(title="final held-out loss (token-weighted; band: min-max over seeds)", xlabel="learning rate", ylabel="loss")
    b.set(title="held-out loss at each init's best lr", xlabel="step", ylabel="loss")
    save_panels(fig, (a, b), path)


def sweep(
    cfg: Config,
    lrs: list[float] | dict[str, list[float]],
    inits: list[str] | None = None,
    ranks: list[int] | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
    out_dir: str | os.PathLike[str] = "runs/sweep",
) -> dict[str, Any]:
    """Train ``cfg`` once per (init, rank, lr, seed) into ``out_dir/<init>-r<r>-lr<lr>-s<seed>``.

    Writes sweep.json (each run's curve and final loss, the best lr per init and rank) and
    sweep.png. The alpha/r ratio of ``cfg`` is kept at every rank, so the LoRA scale is the same.
    ``lrs`` may also map ``"<init>-r<rank>"`` to that pair's own lrs (e.g. each init at its best).
    """
    inits = inits or [cfg.adapter.init]
    ranks = ranks or [cfg.adapter.r]
    seeds = seeds if seeds is not None else [cfg.train.seed]
    steps = steps or cfg.train.max_steps
    check_inits(inits)
    per = lrs if isinstance(lrs, dict) else {f"{i}-r{r}": lrs for i in inits for r in ranks}
    checks = (
        ("--lrs", [v for vs in per.values() for v in vs], lambda v: v > 0),
        ("--ranks", ranks, lambda v: v >= 1),
        ("--steps", [steps], lambda v: v >= 1),
    )
    for name, values, ok in checks:
        bad = [v for v in values if not ok(v)]
        if bad:
            raise ConfigError(
                f"{name}: {bad[0]!r} is out of range"
                + (" (train.max_steps is -1: pass --steps)" if name == "--steps" else "")
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / RUN_CONFIG_FILE)
    grid = [(init, r, lr, s) for r in ranks for init in inits for lr in per.get(f"{init}-r{r}", []) for s in seeds]
    every = eval_every(steps, cfg.train.eval_steps)
    cells = [
        (
            run_name(*g),
            variant(
                cfg,
                g[0],
                g[1],
                out / run_name(*g),
                lr=g[2],
                seed=g[3],
                max_steps=steps,
                eval_steps=every,
                logging_steps=1,
            ),
        )
        for g in grid
    ]
    metrics = run_grid(cells, "sweep")
    runs: dict[str, dict[str, Any]] = {}
    for init, r, lr, seed in grid:
        m = metrics[run_name(init, r, lr, seed)]
        runs[run_name(init, r, lr, seed)] = {
            "init": init,
            "r": r,
            "lr": lr,
            "seed": seed,
            "final_eval_loss": None if diverged(m) else _final(m),
            "eval": m.get("eval", []),
            "history": m.get("history", []),
            "wall_time_s": m.get("compare_wall_time_s", m.get("wall_time_s")),
        }
    summary = summarize(runs)
    summary["runs"] = runs
    summary["config"] = str(out / RUN_CONFIG_FILE)
    summary["grid"] = {"lrs": per, "inits": inits, "ranks": ranks, "seeds": seeds, "steps": steps}
    write_json_atomic(out / "sweep.json", summary)
    plot(summary, out / "sweep.png")
    return summary


def format_summary(summary: dict[str, Any], cfg: Config | None = None) -> str:
    """The lr table, the best lr per init and rank, and the config line to use."""
    lines = [f"{'init-rank':<11} {'lr':>8} {'final loss (mean)':>18} {'min':>7} {'max':>7} {'seeds':>5}"]
    for key, rows in summary["by_lr"].items():
        for row in rows:
            mean = "diverged" if row["mean"] is None else f"{row['mean']:.4f}"
            lo = "-" if row["min"] is None else f"{row['min']:.4f}"
            hi = "-" if row["max"] is None else f"{row['max']:.4f}"
            lines.append(f"{key:<11} {row['lr']:>8g} {mean:>18} {lo:>7} {hi:>7} {row['seeds']:>5}")
    for key, b in summary["best"].items():
        edge = "; at the edge of the grid: widen --lrs" if b["at_grid_edge"] else ""
        lines.append(
            f"best for {key}: lr {b['lr']:g} (final held-out loss {b['final_eval_loss_mean']:.4f}, "
            f"{b['seeds']} seed{'s' if b['seeds'] > 1 else ''}{edge})"
        )
    own = cfg and summary["best"].get(f"{cfg.adapter.init}-r{cfg.adapter.r}")
    for key, b in summary["best"].items():
        if not own or b is own:
            init, r = key.rsplit("-r", 1)
            lines.append(f"config line to use: train: {{lr: {b['lr']:g}}}   # adapter.init {init}, adapter.r {r}")
    return "\n".join(lines)
