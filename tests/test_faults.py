"""Faults while a run goes, one per row of docs/training.md "When things go wrong": a diverged run, a
SIGTERM or Ctrl-C, two runs in one folder, a corrupt checkpoint and a full disk. Each ends in one
line and leaves a state from which ``--resume`` continues (docs/design.md, invariant 20)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from qolora.cli import main
from qolora.config import dump_config
from qolora.files import LOCK_FILE
from qolora.training import run_dir as rd
from qolora.training import train
from qolora.training.guard import DivergedError, DivergenceGuard, SignalStop

from .conftest import add_trainer_callback, child_env, make_tokenizer, tiny_data
from .conftest import tiny_train_config as _cfg

ENV = child_env()


def _history(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["history"]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("qolora ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory, chat_model_dir: Path) -> Path:
    """The tiny chat Llama trained (all weights) on the tiny rows until its loss is far below a uniform
    guess: like a real pretrained model, it can blow up (a random one starts at ln(vocab))."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("pretrained")
    tok = make_tokenizer()
    rows = [json.loads(r) for r in Path(tiny_data(d)).read_text().splitlines()]
    text = [
        tok.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
            tokenize=False,
        )
        for r in rows
    ]
    batch = tok(text, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d / "model"


# --- the divergence guard -------------------------------------------------------------------


def _noisy(seed: int, n: int, kind: str) -> list[float]:
    """Per-step losses around a falling curve: log-uniform 0.5x to 2x, or a 50/50 mix of easy (0.8) and
    hard (10) batches of one example, as the tiny model gives on mixed data at batch 1."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen).tolist()
    if kind == "bimodal":
        return [0.8 if x < 0.5 else 10.0 for x in u]
    return [(0.5 + 2.5 * math.exp(-s / 300)) * math.exp(math.log(0.5) + x * math.log(4.0)) for s, x in enumerate(u)]


def test_guard_trips_on_nan_inf_and_a_sustained_blow_up_not_on_noise() -> None:
    with pytest.raises(DivergedError, match="at step 3: the loss is nan"):
        g = DivergenceGuard()
        g.observe(1, 2.0, 1.0), g.observe(2, 2.0, 1.0), g.observe(3, math.nan, 1.0)
    with pytest.raises(DivergedError, match="at step 1: the gradient norm is inf"):
        DivergenceGuard().observe(1, 2.0, math.inf)
    # the demo at lr 50: 3.8, then 49, then a uniform model's ln(49152) = 10.8 (vocab of SmolLM2)
    g = DivergenceGuard(uniform_loss=math.log(49152))
    with pytest.raises(DivergedError, match=r"at step (\d+): .* above 9.722, 90% of a uniform guess") as e:
        for s in range(1, 60):
            g.observe(s, {1: 3.8, 2: 49.0}.get(s, 10.8), 1.0)
    assert "at step 11:" in str(e.value) and "for 10 steps" in str(e.value)  # steps 2 to 11
    # a blow-up later in a run: 1.0 for 20 steps, then 5.0
    g = DivergenceGuard()
    with pytest.raises(DivergedError, match=r"at step (\d+): .* above 3 x its lowest level 1") as e:
        for s in range(1, 80):
            g.observe(s, 1.0 if s <= 20 else 5.0, 1.0)
    assert g.last_good_step == 26 and "at step 36:" in str(e.value)  # 5.0 is no single-step outlier: the EMA decides
    # noise, 5,000 steps, 4 seeds: never a trip (the bimodal mix is 12x between its two kinds of batch)
    for kind in ("log-uniform", "bimodal"):
        for seed in range(4):
            g = DivergenceGuard(uniform_loss=math.log(49152) if kind == "log-uniform" else None)
            for s, v in enumerate(_noisy(seed, 5000, kind), 1):
                g.observe(s, v, 1.0)


class LrSpike(TrainerCallback):
    """From optimizer step ``at`` + 1 on, lr 1e3: the model becomes a uniform guess after that update."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        if state.global_step >= self.at:
            for g in optimizer.param_groups:
                g["lr"] = 1e3


def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_good_checkpoint(
    pretrained_dir, tmp_path, monkeypatch, capsys
):
    cfg = _cfg(pretrained_dir, tmp_path, lr=1e-4, max_steps=60, save_steps=1, save_total_limit=3)
    dump_config(cfg, tmp_path / "cfg.yaml")
    add_trainer_callback(monkeypatch, LrSpike(5))  # update 6 destroys the model: step 7's loss is ln(vocab)
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "qolora train: error: training diverged at step" in line and "90% of a uniform guess" in line, line
    run = tmp_path / "run"
    assert f"the last good checkpoint is {run / 'checkpoint-5'} (checkpoint-6.diverged set aside" in line, line
    assert "at step 16:" in line  # steps 7 to 16: ten steps at a uniform guess
    assert not (run / "adapter").exists()  # no final adapter that looks good
    assert [n for n, _ in rd.checkpoints(run)] == [3, 4, 5]  # rotation kept 3 good ones, none after
    assert all(rd.seal_problem(d) is None for _, d in rd.checkpoints(run))
    assert (run / "checkpoint-6.diverged").is_dir()  # its weights gave step 7's loss: set aside
    m = json.loads((run / "metrics.json").read_text())
    assert m["divergence_guard"]["factor"] == 3.0 and m["divergence_guard"]["patience"] == 10
    assert m["divergence_guard"]["uniform_loss"] == pytest.approx(math.log(len(make_tokenizer())))
    assert m["stopped"]["reason"] == "diverged" and m["stopped"]["last_checkpoint"] == "checkpoint-5"
    losses = {h["step"]: h["loss"] for h in m["history"]}
    uniform = m["divergence_guard"]["uniform_loss"]
    # the property, not a trajectory (it differs by CPU and release): the steps before the spike are
    # well under the guard's uniform-guess bound, and the step after it is at a uniform guess
    assert max(losses[s] for s in range(1, 7)) < 0.6 * uniform and losses[7] > 0.9 * uniform, losses


def test_a_blow_up_shorter_than_the_patience_stops_at_the_end_in_one_line(
    pretrained_dir, tmp_path, monkeypatch, capsys
):
    """8 steps, the model a uniform guess from step 3 on: 6 steps over the bound, under the patience
    of 10; the run's end is judged before adapter/ is written (as the demo at lr 50 needs)."""
    cfg = _cfg(pretrained_dir, tmp_path, lr=1e-4, max_steps=8, save_steps=2, eval_steps=4)
    dump_config(cfg, tmp_path / "cfg.yaml")
    add_trainer_callback(monkeypatch, LrSpike(2))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "training diverged by its last step 8: the loss (smoothed or not) was above" in line, line
    assert "fewer than the 10 a longer run waits" in line and "no adapter/ was written" in line, line
    run = tmp_path / "run"
    assert not (run / "adapter").exists()
    assert [n for n, _ in rd.checkpoints(run)] == [2]  # the one written before the blow-up
    assert json.loads((run / "metrics.json").read_text())["stopped"]["reason"] == "diverged"


def test_negative_control_a_short_noisy_run_ends_well(pretrained_dir, tmp_path):
    cfg = _cfg(pretrained_dir, tmp_path, lr=3e-3, max_steps=8, batch_size=1, save_steps=4, eval_steps=4)
    train(cfg)
    losses = [h["loss"] for h in _history(tmp_path / "run")]
    assert len(losses) == 8 and max(losses) / min(losses) > 1.3  # per-step noise, and yet
    assert (tmp_path / "run" / "adapter").is_dir()


def test_the_end_judges_the_last_eval_against_the_first() -> None:
    g = DivergenceGuard(uniform_loss=math.log(49152))
    for s, v in enumerate([3.17, 2.86, 3.0, 2.9], 1):  # the steps look fine
        g.observe(s, v, 1.0)
    g.judge_end(4, [3.447, 3.2])  # an ordinary end
    with pytest.raises(DivergedError, match=r"last eval loss 12.51 is above 9.722, 90% of a uniform guess"):
        g.judge_end(4, [3.447, 12.51])  # the demo at lr 50's evals
    with pytest.raises(DivergedError, match=r"last eval loss 5.1 is above 3 x the first eval loss 1.5"):
        DivergenceGuard().judge_end(4, [1.5, 5.1])


def test_nan_stops_before_the_optimizer_applies_it(pretrained_dir, tmp_path, capsys):
    cfg = _cfg(pretrained_dir, tmp_path, lr=1e30, max_steps=10, save_steps=1, warmup_ratio=0.0)
    dump_config(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "diverged at step" in line and "is nan" in line, line
    for _, d in rd.checkpoints(tmp_path / "run"):  # every checkpoint written holds finite weights
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(d / "adapter_model.safetensors").values())


def test_negative_control_an_ordinary_noisy_run_does_not_trip(pretrained_dir, tmp_path):
    """The real loop at batch 1 and an ordinary lr, on the pretrained model (so the uniform-guess bound is
    on): the guard stays quiet and every checkpoint is written; the same losses trip a guard set as
    tight as 1.05 x with patience 1, so the control can fail. (The synthetic test above covers 12x noise.)"""
    cfg = _cfg(pretrained_dir, tmp_path, lr=3e-3, max_steps=24, batch_size=1, save_steps=4)
    train(cfg)
    losses = [h["loss"] for h in _history(tmp_path / "run")]
    assert max(losses) / min(losses) > 1.3  # per-step noise
    assert [n for n, _ in rd.checkpoints(tmp_path / "run")][-1] == 24
    assert (tmp_path / "run" / "adapter").is_dir()  # the end of a noisy run is not a blow-up
    tight = DivergenceGuard(factor=1.05, patience=1, min_steps=1)
    with pytest.raises(DivergedError):
        for s, v in enumerate(losses, 1):
            tight.observe(s, v, 1.0)
    assert "stopped" not in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_divergence_guard_settings_are_checked() -> None:
    from qolora.config import config_from_dict

    with pytest.raises(ValueError, match="train.divergence_factor: must be > 1, got 1.0"):
        config_from_dict({"model": "m", "train": {"divergence_factor": 1.0}})
    with pytest.raises(ValueError, match="train.divergence_patience: must be >= 1, got 0"):
        config_from_dict({"model": "m", "train": {"divergence_patience": 0}})


# --- SIGTERM and SIGINT -----------------------------------------------------------------------

DRIVER = Path(__file__).parent / "dist" / "driver.py"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_then_resume_gives_the_uninterrupted_losses(chat_model_dir, tmp_path, sig):
    (tmp_path / "ref").mkdir()
    # logging every 3 steps: the checkpoint at step 4 falls inside a logging window
    ref = _cfg(chat_model_dir, tmp_path / "ref", max_steps=7, save_steps=100, logging_steps=3)
    train(ref)
    want = _history(tmp_path / "ref" / "run")
    (tmp_path / "cut").mkdir()
    cfg = _cfg(chat_model_dir, tmp_path / "cut", max_steps=7, save_steps=100, logging_steps=3)
    dump_config(cfg, tmp_path / "cut" / "cfg.yaml")
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "train", str(tmp_path / "cut" / "cfg.yaml")],
        env={**ENV, "FAULT": "signal", "SIGNAL": sig},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    run = tmp_path / "cut" / "run"
    assert f"qolora train: stopped by {sig}: wrote checkpoint-4 in" in line and "--resume continues" in line, line
    assert [n for n, _ in rd.checkpoints(run)] == [4] and rd.seal_problem(run / "checkpoint-4") is None
    assert not (run / "adapter").exists()
    stopped = json.loads((run / "metrics.json").read_text())["stopped"]
    assert stopped["reason"] == sig and stopped["step"] == 4 and stopped["signal_to_saved_s"] < 60
    train(cfg, resume=True)
    assert [h["step"] for h in want] == [1, 3, 6]
    assert _history(run) == want  # bit-identical losses, the window 4..6 included


def test_a_second_signal_or_one_before_training_stops_at_once() -> None:
    from qolora._io import RunStopped

    stop = SignalStop()
    with pytest.raises(RunStopped, match="stopped by SIGTERM before a checkpoint") as e:
        stop._handle(signal.SIGTERM, None)  # before the training loop
    assert e.value.exit_code == 143
    stop.in_loop = True
    stop._handle(signal.SIGINT, None)  # in the loop: finish the step, then checkpoint
    assert stop.signum == signal.SIGINT
    with pytest.raises(RunStopped) as e:
        stop._handle(signal.SIGINT, None)  # again: at once
    assert e.value.exit_code == 130


# --- two runs in one folder -------------------------------------------------------------------


def _start_holder(tmp_path: Path, cfg_path: Path) -> subprocess.Popen:
    for f in ("paused", "go"):
        (tmp_path / f).unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), "train", str(cfg_path)],
        env={**ENV, "FAULT": "pause", "PAUSED": str(tmp_path / "paused"), "GO": str(tmp_path / "go")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "paused").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return proc


def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_runs_lock_is_taken_over(
    chat_model_dir, tmp_path, capsys, caplog
):
    cfg = _cfg(chat_model_dir, tmp_path, max_steps=3, save_steps=100)
    dump_config(cfg, tmp_path / "cfg.yaml")
    first = _start_holder(tmp_path, tmp_path / "cfg.yaml")
    try:
        assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"is in use by another qolora train (pid {first.pid} on " in line, line
        assert main(["train", str(tmp_path / "cfg.yaml"), "--resume"]) == 2  # --resume too
        (tmp_path / "go").touch()
        assert first.wait(timeout=240) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    assert (tmp_path / "run" / "adapter").is_dir()  # the first run finished undisturbed

    shutil.rmtree(tmp_path / "run")
    killed = _start_holder(tmp_path, tmp_path / "cfg.yaml")
    killed.kill()  # SIGKILL: no cleanup ran; the kernel released its flock
    killed.wait()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == killed.pid
    with caplog.at_level("WARNING"):
        train(cfg)
    assert f"taking over the lock of a run that was killed (pid {killed.pid} on " in caplog.text


# --- a corrupt or incomplete checkpoint ---------------------------------------------------------


class Crash(TrainerCallback):
    """A crash right after the checkpoint at ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def _truncate(ckpt: Path) -> str:
    p = ckpt / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    return "adapter_model.safetensors is 100 bytes, its seal says"


def _unseal(ckpt: Path) -> str:
    (ckpt / rd.SEAL_FILE).unlink()  # a crash while saving: the seal is written last
    return f"it has no {rd.SEAL_FILE}"


def _flip(ckpt: Path) -> str:
    p = ckpt / "optimizer.pt"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))
    return "optimizer.pt does not match its sha256"


@pytest.mark.parametrize("damage", [_truncate, _unseal, _flip], ids=["truncated", "unsealed", "bit-flip"])
def test_resume_skips_a_corrupt_checkpoint_and_falls_back(chat_model_dir, tmp_path, monkeypatch, caplog, damage):
    (tmp_path / "ref").mkdir()
    ref = _cfg(chat_model_dir, tmp_path / "ref", max_steps=6)
    train(ref)
    want = _history(tmp_path / "ref" / "run")
    (tmp_path / "cut").mkdir()
    cfg = _cfg(chat_model_dir, tmp_path / "cut", max_steps=6)
    with monkeypatch.context() as m:
        add_trainer_callback(m, Crash(4))
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    run = tmp_path / "cut" / "run"
    why = damage(run / "checkpoint-4")
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    add_trainer_callback(monkeypatch, Count())
    with caplog.at_level("WARNING"):
        train(cfg, resume=True)
    assert f"skipping {run / 'checkpoint-4'}: {why}" in caplog.text
    assert "moved to checkpoint-4.incomplete" in caplog.text
    assert steps == [3, 4, 5, 6]  # from checkpoint-2
    assert _history(run) == want
    assert (run / "checkpoint-4.incomplete").is_dir() and rd.seal_problem(run / "checkpoint-4") is None


def test_checkpoints_are_sealed_and_rotation_counts_sealed_ones(chat_model_dir, tmp_path):
    train(_cfg(chat_model_dir, tmp_path, max_steps=6, save_total_limit=2))
    run = tmp_path / "run"
    assert [n for n, _ in rd.checkpoints(run)] == [4, 6]
    from transformers.trainer import TRAINER_STATE_NAME

    assert rd.TRAINER_STATE == TRAINER_STATE_NAME
    seal = json.loads((run / "checkpoint-6" / rd.SEAL_FILE).read_text())["files"]
    assert {"trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= set(seal)


# --- a full disk ------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_earlier_checkpoints(
    chat_model_dir, tmp_path, monkeypatch, capsys
):
    import transformers.trainer

    cfg = _cfg(chat_model_dir, tmp_path, max_steps=6)
    dump_config(cfg, tmp_path / "cfg.yaml")
    real_save = torch.save

    def full_at_step_4(obj, f, *a, **k):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(transformers.trainer.torch, "save", full_at_step_4)
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    run = tmp_path / "run"
    assert line.startswith(f"qolora train: error: no space left on the device writing checkpoint checkpoint-4 to {run}")
    assert "it needs about" in line and "MB free" in line and "--resume" in line, line
    assert [n for n, _ in rd.checkpoints(run)] == [2] and rd.seal_problem(run / "checkpoint-2") is None
    assert not (run / "adapter").exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode == 0


def test_a_really_full_tmpfs_is_one_line(chat_model_dir, tmp_path, monkeypatch, capsys):
    """The same fault on a real filesystem: a 4 MB tmpfs filled up after checkpoint-2."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("needs root and a permitted `mount -t tmpfs` (a real full filesystem); the simulated test ran")
    try:
        cfg = _cfg(chat_model_dir, tmp_path, max_steps=6, output_dir=str(disk / "run"))
        dump_config(cfg, tmp_path / "cfg.yaml")

        class FillTheDisk(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                if state.global_step == 2:
                    free = shutil.disk_usage(disk).free
                    (disk / "filler").write_bytes(b"\0" * max(free - 16 * 1024, 0))

        add_trainer_callback(monkeypatch, FillTheDisk())
        assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "no space left on the device writing" in line and "MB free" in line, line
        run = disk / "run"
        assert rd.seal_problem(run / "checkpoint-2") is None and not (run / "checkpoint-4").exists()
        assert not (run / "adapter").exists()
        (disk / "filler").unlink()
        monkeypatch.undo()
        train(cfg, resume=True)  # space freed: the run continues
        assert (run / "adapter").is_dir()
    finally:
        subprocess.run(["umount", "-l", str(disk)])  # lazy: the test process may still map a file there


def test_a_rank_unwinding_from_a_lost_peer_ends_in_one_line_on_the_launchers_sigterm() -> None:
    """A rank whose collective failed because another rank died unwinds (SignalStop uninstalled) and
    then prints its error line; torchrun's SIGTERM can come in between. It ends the rank in one line
    with exit 143, not silently by the default action (-15: seen once in CI)."""
    script = textwrap.dedent("""
        import os, signal, time
        from qolora.distributed import World
        from qolora.training.guard import SignalStop

        stop = SignalStop(world=World(0, 0, 2), output_dir="runs/x")
        stop.install()
        stop.uninstall()  # as signals_stop's finally does while an error unwinds
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert "[rank 0] stopped by SIGTERM: the launcher stops every rank when one fails" in proc.stderr
