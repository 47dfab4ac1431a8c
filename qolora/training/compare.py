"""``qolora compare``: the same training for each init (and rank), same data order and seed.

Checks OLoRA's claim (arXiv 2406.01775) that it converges faster than LoRA at the same rank,
on the user's own data. Finished runs are kept and reused, so an interrupted comparison
continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .._io import save_figure_atomic, write_json_atomic
from ..choices import INITS
from ..config import Config, dump_config
from . import run_dir as rundir
from .run import train
from .run_dir import CONFIG_FILE, METRICS_FILE, is_finished

logger = logging.getLogger(__name__)


def ema(values: list[float], beta: float = 0.8) -> list[float]:
    out, s = [], None
    for v in values:
        s = v if s is None else beta * s + (1 - beta) * v
        out.append(s)
    return out


def summarize(runs: dict[str, dict[str, Any]], target_loss: float | None = None) -> dict[str, Any]:
    """Per run: loss at fixed steps, steps to a target (EMA-smoothed) train loss, final eval loss, time."""
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, m in runs.items():
        steps = [h["step"] for h in m["history"]]
        line = a.plot(steps, ema([h["loss"] for h in m["history"]]), label=k)[0]
        a.plot(steps, [h["loss"] for h in m["history"]], color=line.get_color(), alpha=0.25)
        ev = m.get("eval", [])
        b.plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o-", color=line.get_color(), label=k)
    a.set(title="train loss (EMA 0.8; raw faint)", xlabel="step", ylabel="loss")
    b.set(title="eval loss", xlabel="step", ylabel="loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure_atomic(fig, path)


def train_once(cfg: Config, name: str) -> dict[str, Any]:
    """Train ``cfg`` into its output_dir unless it finished before; its metrics.json.

    An interrupted run continues from its latest checkpoint.
    """
    run_dir = Path(cfg.train.output_dir)
    metrics = run_dir / METRICS_FILE
    if is_finished(run_dir):
        logger.info("%s is finished; reusing it", name)
    else:
        logger.info("training %s", name)
        t0 = time.perf_counter()
        train(cfg, resume=bool(rundir.checkpoints(run_dir)))
        m = json.loads(metrics.read_text())
        m["compare_wall_time_s"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(metrics, m)
    return json.loads(metrics.read_text())


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
    for init in inits:
        if init not in INITS:
            raise ValueError(f"--inits: expected olora and/or lora, got {init!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for r in ranks or [cfg.adapter.r]:
        for init in inits:
            name = f"{init}-r{r}"
            c = copy.deepcopy(cfg)
            c.adapter.init, c.adapter.r, c.adapter.alpha = init, r, cfg.adapter.alpha * r / cfg.adapter.r
            c.train.output_dir = str(out / name)
            runs[name] = train_once(c, name)
    summary = summarize(runs, target_loss)
    summary["config"] = str(out / CONFIG_FILE)
    dump_config(cfg, out / CONFIG_FILE)
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
