"""One grid runner for ``qolora compare`` and ``qolora sweep``: the same training per cell of a grid
(init, rank, and for a sweep lr and seed), each in its own run folder under one output dir.

Finished runs are reused and an interrupted one resumes from its checkpoint, so a stopped grid
continues where it stopped. A run the divergence guard stops is recorded as diverged (its
``metrics.json`` says so) and reused as such: it is a result of the grid, not an error of it.
"""

from __future__ import annotations

import copy
import logging
import re
import statistics
import time
from pathlib import Path
from typing import Any

from .._io import save_figure_atomic, write_json_atomic
from ..choices import INITS
from ..config import Config, ConfigError
from ..files import METRICS_FILE
from ..inits import InitSpec
from . import run_dir
from .guard import DivergedError

logger = logging.getLogger(__name__)


def parse_init(label: str) -> InitSpec:
    """A grid's init label: ``olora``, ``pissa``, ``loftq``, ``lora``, with ``-tT`` for T rounds
    (``olora-t4``, ``loftq-t4``) or ``-niterK`` for pissa's randomized SVD (``pissa-niter4``)."""
    m = re.fullmatch(r"([a-z]+)(?:-t(\d+))?(?:-niter(\d+))?", label)
    if m is None or m[1] not in INITS:
        raise ConfigError(f"--inits: expected {', '.join(INITS)} (olora-t4, loftq-t4, pissa-niter4), got {label!r}")
    try:
        return InitSpec(m[1], int(m[2] or 1), None if m[3] is None else int(m[3]))
    except ValueError as e:
        raise ConfigError(f"--inits {label}: {e}") from e


def check_inits(inits: list[str]) -> None:
    for init in inits:
        parse_init(init)


def variant(cfg: Config, init: str, r: int, output_dir: Path, **train: Any) -> Config:
    """``cfg`` with another init (a ``parse_init`` label) and rank (the alpha/r ratio kept, so the LoRA
    scale is the same), its own output dir and any ``train`` fields overridden."""
    spec = parse_init(init)
    c = copy.deepcopy(cfg)
    c.adapter.init, c.adapter.r, c.adapter.alpha = spec.method, r, cfg.adapter.alpha * r / cfg.adapter.r
    c.adapter.init_iters, c.adapter.svd_niter = spec.iters, spec.svd_niter
    c.train.output_dir = str(output_dir)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def diverged(m: dict[str, Any]) -> bool:
    return (m.get("stopped") or {}).get("reason") == "diverged"


def train_once(cfg: Config, name: str) -> dict[str, Any]:
    """Train ``cfg`` into its output dir unless it finished (or diverged) before; its ``metrics.json``."""
    from .run import train

    out = Path(cfg.train.output_dir)
    before = run_dir.read_metrics(out)
    if run_dir.is_finished(out) or diverged(before):
        logger.info("%s %s before; reusing it", name, "diverged" if diverged(before) else "finished")
        return before
    logger.info("training %s", name)
    t0 = time.perf_counter()
    try:
        train(cfg, resume=bool(run_dir.checkpoints(out)))
    except DivergedError as e:
        logger.warning("%s: %s", name, str(e).split(";")[0])
    m = run_dir.read_metrics(out)
    m["compare_wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / METRICS_FILE, m)
    return m


def run_grid(cells: list[tuple[str, Config]], what: str) -> dict[str, dict[str, Any]]:
    """Train every ``(name, config)`` cell in order (``train_once``); their metrics by name. Logs each
    run to train with how many are left and, after the first, about how long they take."""
    runs: dict[str, dict[str, Any]] = {}
    took: list[float] = []
    for i, (name, c) in enumerate(cells, 1):
        out = Path(c.train.output_dir)
        fresh = not (run_dir.is_finished(out) or diverged(run_dir.read_metrics(out)))
        if fresh:
            left = sum(1 for _, cc in cells[i - 1 :] if not run_dir.is_finished(Path(cc.train.output_dir)))
            eta = f"; about {statistics.fmean(took) * left / 60:.0f} min left" if took else ""
            logger.info("%s: run %d of %d: %s (%d to train%s)", what, i, len(cells), name, left, eta)
        t0 = time.perf_counter()
        runs[name] = train_once(c, name)
        if fresh:
            took.append(time.perf_counter() - t0)
    return runs


def two_panels() -> tuple[Any, Any, Any]:
    """A 12 x 4.5 in figure with two side-by-side axes (the compare and sweep plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    return fig, a, b


def save_panels(fig: Any, axes: tuple[Any, ...], path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure_atomic(fig, path)
