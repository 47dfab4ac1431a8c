"""Run outputs written at every checkpoint and at the end: ``metrics.json`` and ``loss.png``."""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .._io import peak_rss_bytes, save_figure_atomic, write_json_atomic
from ..files import METRICS_FILE, PLOT_FILE

logger = logging.getLogger(__name__)


def peak_memory_bytes() -> dict[str, int]:
    """Peak CUDA allocation (if any) and the process's peak RSS."""
    out = {"cpu_peak_rss": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated())
    return out


# TRL's metrics kept beside the loss (prefixes), as TRL names them; generation_s is ours (sampling.py)
KEPT = ("reward", "kl", "completions/mean_length", "step_time", "generation_s")


def _kept(e: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k: v for k, v in e.items() if any(k.startswith(prefix + name) for name in KEPT)}


def metrics_from_history(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The train loss and eval loss per logged step, with a preference method's rewards (chosen,
    rejected, margins, accuracies), GRPO's reward mean and std (overall and per function) and
    completion length, and KL, as TRL logs them."""
    history = [
        {"step": e["step"], "loss": e["loss"], **_kept(e, "")} for e in log_history if "loss" in e and "step" in e
    ]
    evals = [
        {"step": e["step"], "eval_loss": e["eval_loss"], **_kept(e, "eval_")} for e in log_history if "eval_loss" in e
    ]
    return {"history": history, "eval": evals, **generation_share(history)}


def generation_share(history: list[dict[str, Any]]) -> dict[str, Any]:
    """GRPO: the share of the train steps' time spent sampling completions (``generation_s`` over
    TRL's ``step_time``, which holds it), over the logged steps that have both."""
    both = [(x["generation_s"], x["step_time"]) for x in history if "generation_s" in x and "step_time" in x]
    total = sum(s for _, s in both)
    return {"generation_share": round(sum(g for g, _ in both) / total, 3)} if total > 0 else {}


def plot_loss(metrics: dict[str, Any], path: Path) -> None:
    """Train and eval loss against the step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    h, e = metrics["history"], metrics["eval"]
    if h:
        ax.plot([x["step"] for x in h], [x["loss"] for x in h], label="train loss")
    if e:
        ax.plot([x["step"] for x in e], [x["eval_loss"] for x in e], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    # a preference method's reward margin, or GRPO's reward mean, on a second axis
    second = next(
        (k for k in ("rewards/margins", "reward") if any(k in x for x in h) or any(f"eval_{k}" in x for x in e)), None
    )
    if second:
        label = "reward margin (chosen - rejected)" if second == "rewards/margins" else "reward (mean)"
        ax2 = ax.twinx()
        pts = [(x["step"], x[second]) for x in h if second in x]
        ax2.plot([s for s, _ in pts], [m for _, m in pts], color="tab:green", alpha=0.6, label=f"train {label}")
        pts = [(x["step"], x[f"eval_{second}"]) for x in e if f"eval_{second}" in x]
        if pts:
            ax2.plot([s for s, _ in pts], [m for _, m in pts], "s-", color="tab:red", label=f"eval {label}")
        ax2.set_ylabel(label)
        ax2.legend(loc="upper right")
    save_figure_atomic(fig, path)


class MetricsCallback(TrainerCallback):
    """Writes ``metrics.json`` and ``loss.png`` into the output dir at each save and at the end."""

    def __init__(self, output_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        self.out = Path(output_dir)
        self.extra = extra or {}
        self.t0 = time.perf_counter()
        self.tokens0 = 0
        self.step_s: list[float] = []  # each optimizer step's wall time, evals and saves left out
        self._step_t: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._step_t = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._step_t is not None:
            self.step_s.append(time.perf_counter() - self._step_t)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.t0 = time.perf_counter()
        self.tokens0 = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def write(self, state: Any) -> dict[str, Any]:
        m = metrics_from_history(state.log_history)
        wall = time.perf_counter() - self.t0
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        m.update(
            {
                "global_step": state.global_step,
                "max_steps": state.max_steps,
                "wall_time_s": round(wall, 2),
                "tokens_seen": tokens,
                "tokens_per_s": round((tokens - self.tokens0) / wall, 1) if wall > 0 else None,
                "step_s_median": round(statistics.median(self.step_s), 3) if self.step_s else None,
                "peak_memory_bytes": peak_memory_bytes(),
                **self.extra,
            }
        )
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / METRICS_FILE, m)
        try:
            plot_loss(m, self.out / PLOT_FILE)
        except Exception as e:  # a plot must never end a training run
            logger.warning("could not write %s: %s", self.out / PLOT_FILE, e)
        return m

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero:
            self.write(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero:
            self.write(state)
