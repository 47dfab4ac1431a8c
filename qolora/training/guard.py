"""Faults while a run goes: a diverging loss, and a SIGTERM or Ctrl-C that should cost no work.

``DivergenceGuard`` watches every optimizer step's loss and gradient norm; ``SignalStop`` turns
SIGTERM and SIGINT into "finish this step, write a checkpoint, exit". Both end the run with one
line (``RunStopped``), and neither writes a final adapter: the run's state is its last complete
checkpoint, which ``--resume`` continues.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .._io import RunStopped

logger = logging.getLogger(__name__)


class DivergedError(ValueError):
    """The loss or gradient norm diverged: one line naming the step and the value (exit 2)."""


@dataclass
class DivergenceGuard:
    """Stops a run at the first non-finite loss or gradient norm, or when the smoothed loss stays
    above its bound, or each step's loss above its own (``step_bound``), for ``patience`` steps in a row.

    The smoothed loss is an exponential moving average over about 10 steps (``beta`` 0.9). Its bound
    is the lower of two:
    - ``factor`` × its lowest level, the lowest of a slower average over about 50 steps (``slow_beta``
      0.98, bias-corrected, so a running mean at first), counted from step ``min_steps`` on: one
      lucky first batch does not set the bar;
    - 90% of ``uniform_loss`` (ln of the vocabulary size: the loss of a uniform guess), for a run
      that began below 75% of it: a pretrained model that drifts to a uniform guess has diverged
      (the demo at lr 50 does; a random-init test model starts there and is exempt).

    With ``from_start`` (preference methods) the bound is ``factor`` x the first step's loss
    instead, and a step's own bound twice that: a preference loss starts where the policy is the
    reference (ln 2 for DPO's sigmoid loss) and may fall towards 0 as the pairs are learned, so its
    lowest level is no measure of a blow-up, and there is no vocabulary rule. DPO at factor 3 stops
    when the smoothed loss stays above 3 ln 2: the policy then prefers the rejected answers by a
    log-ratio margin of ln 7 / beta (sigmoid(-ln 7) = 1/8).

    With ``finite_only`` (GRPO) only a non-finite loss or gradient norm stops the run: GRPO's loss
    is a policy-gradient surrogate near 0, of either sign, whose level says nothing of a blow-up.

    Note:
        While a step's loss or the smoothed loss is above the bound the run is "suspect": no
        checkpoint is written (it is written at the first step that is not), and the checkpoint
        before a suspect step is set aside, since the loss of step N+1 is the first one computed
        with the weights of checkpoint N. So the last checkpoint on disk is from before the blow-up.
    """

    factor: float = 3.0
    patience: int = 10
    uniform_loss: float | None = None
    from_start: bool = False
    finite_only: bool = False
    beta: float = 0.9
    slow_beta: float = 0.98
    min_steps: int = 10
    ema: float | None = None
    slow: float = 0.0
    seen: int = 0
    first: float | None = None
    lowest: float = math.inf
    over: int = 0
    last_above: bool = False
    last_loss: float | None = None
    last_good_step: int = 0

    @property
    def suspect(self) -> bool:
        """The last step's loss, or the smoothed loss, is above the bound."""
        return self.over > 0 or self.last_above

    def bound(self) -> float:
        """What the smoothed loss may reach now (inf before anything bounds it)."""
        if self.finite_only:
            return math.inf
        if self.from_start:
            return self.factor * self.first if self.first is not None else math.inf
        b = self.factor * self.lowest
        if self._uniform_applies():
            b = min(b, 0.9 * self.uniform_loss)
        return b

    def step_bound(self) -> float:
        """What one step's own loss may reach: twice the smoothed bound (one bad batch is noise),
        but no more than 90% of a uniform guess's loss (no batch of a working model is that bad)."""
        if self.from_start:
            return 2 * self.bound()
        b = 2 * self.factor * self.lowest
        if self._uniform_applies():
            b = min(b, 0.9 * self.uniform_loss)
        return b

    def _uniform_applies(self) -> bool:
        return self.uniform_loss is not None and self.first is not None and self.first < 0.75 * self.uniform_loss

    def observe(self, step: int, loss: float, grad_norm: float | None) -> None:
        """Take step ``step``'s loss (and gradient norm, None if not checked).

        Raises:
            DivergedError: non-finite loss or gradient norm, or a sustained blow-up.
        """
        if not math.isfinite(loss):
            raise DivergedError(f"training diverged at step {step}: the loss is {loss}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise DivergedError(f"training diverged at step {step}: the gradient norm is {grad_norm} (loss {loss:.4g})")
        self.first = loss if self.first is None else self.first
        self.last_loss = loss
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        self.seen += 1
        self.slow = self.slow_beta * self.slow + (1 - self.slow_beta) * loss
        if self.seen >= self.min_steps:
            self.lowest = min(self.lowest, self.slow / (1 - self.slow_beta**self.seen))
        bound = self.bound()
        self.last_above = loss > self.step_bound()
        if self.ema > bound or self.last_above:
            self.over += 1
            if self.over >= self.patience:
                raise DivergedError(
                    f"training diverged at step {step}: the loss (smoothed or not) has been above "
                    f"{self._why(bound)} for {self.over} steps (loss {loss:.4g}, smoothed {self.ema:.4g})"
                )
        else:
            self.over = 0
            self.last_good_step = step

    def judge_end(self, step: int, evals: list[float]) -> None:
        """The run as a whole, at its end, before ``adapter/`` is written: a blow-up shorter than the
        patience (a short run, or one in a run's last steps) is caught here.

        - A run that ends suspect (its last step's loss, or the smoothed loss, above the bound; its
          checkpoint was held back) has diverged.
        - So has one whose last eval loss is above the bound the guard puts on the smoothed loss,
          taken from its first eval: ``factor`` x that, or 90% of a uniform guess's loss for a run
          that began below 75% of it.

        Raises:
            DivergedError: one line naming the step and the figures.
        """
        if self.suspect:
            bound = self.bound()
            raise DivergedError(
                f"training diverged by its last step {step}: the loss (smoothed or not) was above "
                f"{self._why(bound)} for its last {max(self.over, 1)} steps (loss {self.last_loss:.4g}, smoothed "
                f"{self.ema:.4g}), fewer than the {self.patience} a longer run waits"
            )
        if len(evals) < 2 or self.finite_only:
            return
        first, last = evals[0], evals[-1]
        limit, why = self.factor * first, f"{self.factor:g} x the first eval loss {first:.4g}"
        if self.uniform_loss is not None and first < 0.75 * self.uniform_loss and 0.9 * self.uniform_loss < limit:
            limit = 0.9 * self.uniform_loss
            why = f"{limit:.4g}, 90% of a uniform guess's loss ln(vocab) = {self.uniform_loss:.4g}"
        if last > limit:
            raise DivergedError(
                f"training diverged by its last step {step}: the last eval loss {last:.4g} is above {why}"
            )

    def _why(self, bound: float) -> str:
        if self.from_start:
            return f"{self.factor:g} x the first step's loss {self.first:.4g}"
        if bound == self.factor * self.lowest:
            return f"{self.factor:g} x its lowest level {self.lowest:.4g}"
        return f"{bound:.4g}, 90% of a uniform guess's loss ln(vocab) = {self.uniform_loss:.4g}"

    def settings(self) -> dict[str, float | None]:
        return {
            "factor": self.factor,
            "patience": self.patience,
            "uniform_loss": self.uniform_loss,
            "from_start": self.from_start,
            "finite_only": self.finite_only,
            "beta": self.beta,
            "slow_beta": self.slow_beta,
            "min_steps": self.min_steps,
        }

    STATE = ("ema", "slow", "seen", "first", "lowest", "over", "last_above", "last_good_step")

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state(self, s: dict[str, Any]) -> None:
        for k in self.STATE:
            if k in s:
                setattr(self, k, s[k])


class RunState(TrainerCallback, ExportableState):
    """What a resume needs beyond the Trainer's own state, in each checkpoint's ``trainer_state.json``:
    the guard's state, and the open logging window (the loss summed since the last logged step).

    Note:
        A checkpoint between two logging steps (SIGTERM's) would otherwise start a new window at
        the resume, and the first loss logged after it would average fewer steps than the
        uninterrupted run's. The window's sum is the mean over ranks, as the Trainer logs it.
    """

    def __init__(self, guard: DivergenceGuard | None = None) -> None:
        self.guard = guard
        self.window: dict[str, float] = {}  # set at each save: {"loss_sum", "since"}
        self.pending: dict[str, float] = {}  # from the checkpoint resumed, applied at train begin
        self.trainer: Any = None

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"saved": self.guard.state() if self.guard else {}, "window": self.window}}

    def load(self, saved: dict[str, Any]) -> None:
        """Restore from a checkpoint's ``stateful_callbacks["RunState"]["attributes"]``."""
        if self.guard is not None:
            self.guard.load_state(saved.get("saved", {}))
        self.pending = saved.get("window", {})

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        t = self.trainer
        if t is not None and t.save_deferred and not (t.guard and t.guard.suspect):
            control.should_save = True  # the checkpoint a suspect step held back

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        t = self.trainer
        if self.pending and t is not None and self.pending.get("since", -1) <= state.global_step:
            t._tr_loss += self.pending["loss_sum"]
            t._globalstep_last_logged = int(self.pending["since"])
        self.pending = {}


GRACE_S = 25.0  # torchrun waits 30 s between its SIGTERM to the workers and its SIGKILL


@dataclass
class SignalStop(TrainerCallback):
    """SIGTERM (how SLURM, Kubernetes and spot GPUs stop a job) and SIGINT (Ctrl-C): the step in
    progress finishes, a checkpoint of it is written, and the run ends with ``RunStopped``.

    A second signal, or one that comes before training starts, stops at once: every output is
    atomic, so the last complete checkpoint stays what ``--resume`` continues from.

    With several ranks (``world``) the ranks agree on the stop at every step's end (one all-reduce
    of a flag), so a signal to any of them checkpoints the same step on all. When torchrun sends
    its SIGTERM because another rank died, no common checkpoint can be written: the collective
    with the dead rank fails (one line, ``distributed.lost_rank_as_one_line``), or, should it hang,
    a watchdog thread, woken by the signal even while the main thread is blocked in C, exits in one
    line after ``grace_s``.
    """

    world: Any = None  # distributed.World
    output_dir: str = ""
    grace_s: float = GRACE_S
    signum: int | None = None
    at: float | None = None
    in_loop: bool = False
    saved_step: int | None = None
    saved_s: float | None = None
    _previous: dict[int, Any] = field(default_factory=dict)
    _finished: threading.Event = field(default_factory=threading.Event)
    _wakeup: tuple[int, int, int] | None = None  # read fd, write fd, the previous wakeup fd

    @property
    def several(self) -> bool:
        return self.world is not None and self.world.size > 1

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        if self.several:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(r,), daemon=True, name="qolora-signal-watchdog").start()

    def uninstall(self) -> None:
        self._finished.set()
        for s, h in self._previous.items():
            if self.several:
                # stopping on an agreed checkpoint: the launcher's SIGTERM, sent when the first rank
                # exits, must not cut the others' last lines short. Unwinding because another rank died
                # (a failed collective), its SIGTERM can come before this rank's error line: it ends the
                # rank in one line then, not silently by the default action
                h = signal.SIG_IGN if self.signum is not None else self._launcher_stop
            signal.signal(s, h)
        self._previous.clear()
        if self._wakeup is not None:
            r, w, old = self._wakeup
            signal.set_wakeup_fd(old)
            os.close(w)  # the watchdog reads EOF and ends
            self._wakeup = None

    def done(self) -> None:
        """The stop is recorded: later signals are ignored and the watchdog stands down."""
        self._finished.set()

    def _watch(self, r: int) -> None:
        try:
            while b := os.read(r, 1):
                if b[0] in (signal.SIGTERM, signal.SIGINT):
                    if not self._finished.wait(self.grace_s):
                        self._exit_now(
                            b[0],
                            f"no checkpoint common to every rank within {self.grace_s:.0f} s (one may have died: "
                            "the launcher stops every rank when one fails)",
                        )
                    return
        finally:
            os.close(r)

    def _launcher_stop(self, signum: int, frame: Any) -> None:
        self._exit_now(signum, "the launcher stops every rank when one fails")

    def _exit_now(self, signum: int, why: str) -> None:
        from .. import distributed

        distributed.exit_now(self.world, signum, why, self.output_dir)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._finished.is_set():  # the agreed checkpoint is written: this process is exiting already
            return
        if self.signum is not None or not self.in_loop:
            if self.several:  # a collective may be waiting for a rank that is gone: no unwinding
                self._exit_now(signum, "before a checkpoint of the current step was written")
            raise RunStopped(
                f"stopped by {name} before a checkpoint of the current step was written; --resume continues from "
                "the last complete checkpoint",
                128 + signum,
            )
        self.signum, self.at = signum, time.perf_counter()
        logger.warning("%s: finishing this step, then writing a checkpoint and stopping (again: stop at once)", name)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.in_loop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        stop = self.signum is not None
        if self.several:  # every rank decides from the same all-reduced flag, never from its own alone
            from .. import distributed

            (agreed,) = distributed.all_reduce_sum([float(self.signum or 0)], self.world, args.device)
            stop = agreed > 0
            if stop and self.signum is None:
                self.signum = signal.SIGINT if agreed == signal.SIGINT else signal.SIGTERM  # a sum of signals: TERM
                self.at = time.perf_counter()
                logger.warning("another rank was signalled: writing a checkpoint of this step and stopping")
        if stop:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.signum is not None and self.saved_step is None:
            self.saved_step, self.saved_s = state.global_step, round(time.perf_counter() - self.at, 2)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.in_loop = False

    def report(self) -> dict[str, Any] | None:
        if self.signum is None:
            return None
        return {"reason": signal.Signals(self.signum).name, "step": self.saved_step, "signal_to_saved_s": self.saved_s}
