"""``qolora compare``: the same training for each init (and rank), same data order and seed.

Checks OLoRA's claim (arXiv 2406.01775) that it converges faster than LoRA at the same rank,
on the user's own data. The runs go through the grid runner (``grid.py``): finished runs are
reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .._io import write_json_atomic
from ..config import Config, dump_config
from ..files import RUN_CONFIG_FILE
from .grid import check_inits, run_grid, save_panels, two_panels, variant

logger = logging.getLogger(__name__)


def ema(values: list[float], beta: float = 0.8) -> list[float]:
    out, s = [], None
    for v in values:
        s = v if s is None else beta * s + (1 - beta) * v
        out.append(s)
    return out


def summarize(runs: dict[str, dict[str, Any]], target_loss: float | None = None) -> dict[str, Any]:
    """Per run: loss at fixed steps, steps to a target (EMA-smoothed) train loss, final eval loss, time."""
    runs = {k: m for k, m in runs.items() if m.get("history")}  # a run that diverged at step 1 has none
    smooth = {k: ema([h["loss"] for h in m["history"]]) for k, m in runs.items()}
    if target_loss is None:  # the worst run's final smoothed loss: every run reaches it
        target_loss = max(s[-1] for s in smooth.values())
    out: dict[str, Any] = {"target_loss": target_loss, "runs": {}}
    for k, m in runs.items():
        steps = [h["step"] for h in m["history"]]
        n = steps[-1]
        marks = sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75, 1.0)})
        at = {str(s): next(h["loss"] for h in m["history"] if h["step"] >= s) for s in marks}
        reached = next((st for st, v in zip(steps, smooth[k]) if v <= target_loss), None)
        evals = m.get("eval", [])
        out["runs"][k] = {
            "loss_at_step": at,
            "steps_to_target": reached,
            "first_eval_loss": evals[0]["eval_loss"] if evals else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "final_train_loss_ema": smooth[k][-1],
            "wall_time_s": m.get("compare_wall_time_s", m.get("wall_time_s")),
        }
    return out


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    fig, a, b = two_panels()
    for k, m in runs.items():
        steps = [h["step"] for h in m["history"]]
        line = a.plot(steps, ema([h["loss"] for h in m["history"]]), label=k)[0]
        a.plot(steps, [h["loss"] for h in m["history"]], color=line.get_color(), alpha=0.25)
        ev = m.get("eval", [])
        b.plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o-", color=line.get_color(), label=k)
    a.set(title="train loss (EMA 0.8; raw faint)", xlabel="step", ylabel="loss")
    b.set(title="eval loss", xlabel="step", ylabel="loss")
    save_panels(fig, (a, b), path)


def compare(
    cfg: Config,
    inits: list[str],
    ranks: list[int] | None = None,
    out_dir: str | os.PathLike[str] = "runs/compare",
    target_loss: float | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` once per (init, rank) into ``out_dir/<init>-r<rank>``; write compare.json and compare.png.

    The alpha/r ratio of ``cfg`` is kept at every rank, so the LoRA scale is the same.
    """
    check_inits(inits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(f"{i}-r{r}", variant(cfg, i, r, out / f"{i}-r{r}")) for r in ranks or [cfg.adapter.r] for i in inits]
    runs = run_grid(cells, "compare")
    summary = summarize(runs, target_loss)
    summary["config"] = str(out / RUN_CONFIG_FILE)
    dump_config(cfg, out / RUN_CONFIG_FILE)
    write_json_atomic(out / "compare.json", summary)
    plot(runs, out / "compare.png")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"target train loss (EMA): {summary['target_loss']:.4f}",
        f"{'run':<12} {'steps to target':>15} {'first eval':>10} {'final eval':>10} {'wall s':>8}",
    ]
    for k, r in summary["runs"].items():
        fe = "-" if r["first_eval_loss"] is None else f"{r['first_eval_loss']:.4f}"
        le = "-" if r["final_eval_loss"] is None else f"{r['final_eval_loss']:.4f}"
        lines.append(f"{k:<12} {str(r['steps_to_target']):>15} {fe:>10} {le:>10} {r['wall_time_s']!s:>8}")
    return "\n".join(lines)
