"""``train.lr: auto``, the token-weighted eval loss, and ``qolora sweep`` on a tiny model."""

from __future__ import annotations

import json

import pytest

from qolora.cli import main
from qolora.config import ConfigError, config_from_dict
from qolora.training.lr import AUTO_LR, resolve_lr
from qolora.training.sweep import eval_every, format_summary, parse_list, summarize, sweep

from .conftest import add_trainer_callback
from .conftest import tiny_train_config as _cfg


def test_auto_lr_is_per_init_and_rank_and_an_explicit_lr_wins() -> None:
    assert resolve_lr(5e-4, "olora", 16, 16) == (5e-4, "set explicitly")
    for r in (16, 64):
        assert resolve_lr("auto", "olora", r, r)[0] == AUTO_LR[("olora", r)]
        assert resolve_lr("auto", "lora", r, r)[0] == AUTO_LR[("lora", r)]
        assert AUTO_LR[("olora", r)] < AUTO_LR[("lora", r)]  # OLoRA's A starts at the scale of W
    mid, why = resolve_lr("auto", "olora", 32, 32)
    lo, hi = sorted((AUTO_LR[("olora", 16)], AUTO_LR[("olora", 64)]))
    assert lo <= mid <= hi and "interpolated" in why
    assert resolve_lr("auto", "olora", 8, 8)[0] == AUTO_LR[("olora", 16)]
    assert resolve_lr("auto", "lora", 128, 128)[0] == AUTO_LR[("lora", 64)]
    doubled, why = resolve_lr("auto", "lora", 16, 32)  # LoRA scale 2
    assert doubled == pytest.approx(AUTO_LR[("lora", 16)] / 2) and "alpha/r = 2" in why


def test_lr_defaults_to_auto_and_is_checked() -> None:
    base = {"model": "m", "data": {"train": "t.jsonl"}}
    assert config_from_dict(base).train.lr == "auto"
    assert config_from_dict(base, ["train.lr=3e-4"]).train.lr == 3e-4
    with pytest.raises(ConfigError, match="train.lr: expected float or 'auto', got 'fast'"):
        config_from_dict(base, ["train.lr=fast"])


def test_train_logs_the_resolved_lr(chat_model_dir, tmp_path, monkeypatch) -> None:
    from transformers import TrainerCallback

    from qolora.training import train

    cfg = _cfg(chat_model_dir, tmp_path, max_steps=2, lr="auto", eval_steps=2, save_steps=2)
    seen = []

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen.append(args.learning_rate)

    add_trainer_callback(monkeypatch, Grab())
    train(cfg)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["lr"] == {"value": AUTO_LR[("olora", 16)], "why": "the olora r16 entry of AUTO_LR (nearest rank to 4)"}
    assert seen == [AUTO_LR[("olora", 16)]]


def test_eval_loss_is_token_weighted(chat_model_dir, tmp_path) -> None:
    """QoloraTrainer's eval loss equals ``qolora eval``'s completion_loss, not a mean of batch means."""
    from qolora.adapters import get_qolora_model
    from qolora.training.evaluate import completion_loss
    from qolora.training.run import load_base, load_tokenizer, lora_config, prepare_data
    from qolora.training.tokenize import take
    from qolora.training.trainer import build_trainer

    cfg = _cfg(chat_model_dir, tmp_path, batch_size=2)
    tok = load_tokenizer(cfg.model)
    train_ex, eval_ex, _ = prepare_data(cfg, tok)
    eval_ex = take(eval_ex)  # the memory-mapped Dataset as a list, to edit one example
    eval_ex = eval_ex[:3] + [
        dict(eval_ex[3], labels=[-100] * (len(eval_ex[3]["labels"]) - 1) + [eval_ex[3]["labels"][-1]])
    ]
    model = get_qolora_model(load_base(cfg), lora_config(cfg))
    for chunked in (True, False):
        cfg.train.chunked_ce = chunked
        trainer = build_trainer(model, tok, train_ex, eval_ex, cfg)
        got = trainer.evaluate()
        want = completion_loss(model, eval_ex, tok.pad_token_id, batch_size=2)
        assert got["eval_loss"] == pytest.approx(want.loss, rel=1e-5, abs=1e-6)
        assert got["eval_tokens"] == want.tokens
    # the batch-mean average differs here: the last batch holds one example with one label token
    batch_means = [completion_loss(model, eval_ex[i : i + 2], tok.pad_token_id).loss for i in (0, 2)]
    assert abs(sum(batch_means) / 2 - want.loss) > 1e-3


def test_sweep_summary_picks_the_best_lr_and_ranks_diverged_runs_last() -> None:
    def run(init, lr, seed, loss):
        return {"init": init, "r": 16, "lr": lr, "seed": seed, "final_eval_loss": loss, "eval": [], "history": []}

    runs = {
        str(i): r
        for i, r in enumerate(
            [
                run("olora", 1e-4, 0, 1.3),
                run("olora", 1e-4, 1, 1.5),
                run("olora", 3e-4, 0, 1.2),
                run("olora", 3e-4, 1, 1.6),
                run("olora", 1e-3, 0, None),
                run("olora", 1e-3, 1, 1.0),
                run("lora", 1e-4, 0, 2.0),
                run("lora", 1e-3, 0, 1.25),
            ]
        )
    }
    s = summarize(runs)
    assert s["best"]["olora-r16"]["lr"] == 1e-4 and s["best"]["olora-r16"]["final_eval_loss_mean"] == pytest.approx(1.4)
    assert s["best"]["olora-r16"]["min"] == 1.3 and s["best"]["olora-r16"]["max"] == 1.5
    assert s["by_lr"]["olora-r16"][2] == {"lr": 1e-3, "mean": None, "min": 1.0, "max": None, "seeds": 2, "diverged": 1}
    assert s["best"]["lora-r16"] == {
        "lr": 1e-3,
        "final_eval_loss_mean": 1.25,
        "min": 1.25,
        "max": 1.25,
        "seeds": 1,
        "at_grid_edge": True,
    }
    s["runs"] = runs
    text = format_summary(s)
    assert "at the edge of the grid: widen --lrs" in text and "train: {lr: 0.0001}   # adapter.init olora" in text


def test_sweep_helpers() -> None:
    assert parse_list("3e-5, 1e-4", float, "--lrs") == [3e-5, 1e-4]
    assert parse_list("16,64", int, "--ranks") == [16, 64]
    with pytest.raises(ConfigError, match="--ranks: 'x' is not a int"):
        parse_list("16,x", int, "--ranks")
    assert eval_every(40, 10) == 10 and eval_every(30, 20) == 15 and eval_every(7, 3) == 1


def test_sweep_trains_the_grid_then_reuses_it(chat_model_dir, tmp_path, monkeypatch) -> None:
    cfg = _cfg(chat_model_dir, tmp_path, eval_steps=2, save_steps=2)
    out = tmp_path / "sweep"
    s = sweep(cfg, [1e-3, 1e-2], ["olora", "lora"], [4], [0], steps=2, out_dir=out)
    assert sorted(s["runs"]) == ["lora-r4-lr0.001-s0", "lora-r4-lr0.01-s0", "olora-r4-lr0.001-s0", "olora-r4-lr0.01-s0"]
    for name, m in s["runs"].items():
        assert [e["step"] for e in m["eval"]] == [0, 2] and m["final_eval_loss"] == m["eval"][-1]["eval_loss"]
        cfg_run = (out / name / "config.yaml").read_text()
        assert f"lr: {m['lr']}" in cfg_run and "max_steps: 2" in cfg_run
    assert set(s["best"]) == {"olora-r4", "lora-r4"}
    assert (out / "sweep.png").stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["best"] == s["best"]

    import qolora.training.run as run

    monkeypatch.setattr(run, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = sweep(cfg, [1e-3, 1e-2], ["olora", "lora"], [4], [0], steps=2, out_dir=out)
    assert again["best"] == s["best"]


def test_a_run_the_guard_stops_is_a_diverged_cell_not_a_failed_sweep(chat_model_dir, tmp_path, monkeypatch) -> None:
    cfg = _cfg(chat_model_dir, tmp_path, eval_steps=2, save_steps=2, warmup_ratio=0.0)
    out = tmp_path / "sweep"
    s = sweep(cfg, [1e-3, 1e30], ["olora"], [4], [0], steps=3, out_dir=out)  # lr 1e30: a nan loss at step 2
    assert s["runs"]["olora-r4-lr1e+30-s0"]["final_eval_loss"] is None
    assert s["by_lr"]["olora-r4"][1]["diverged"] == 1 and s["best"]["olora-r4"]["lr"] == 1e-3
    assert json.loads((out / "olora-r4-lr1e+30-s0" / "metrics.json").read_text())["stopped"]["reason"] == "diverged"
    import qolora.training.run as run

    monkeypatch.setattr(run, "train", lambda *a, **k: pytest.fail("a diverged run was trained again"))
    assert sweep(cfg, [1e-3, 1e30], ["olora"], [4], [0], steps=3, out_dir=out)["best"] == s["best"]


def test_sweep_cli_errors_are_one_line(chat_model_dir, tmp_path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {chat_model_dir}\ndata: {{train: {tmp_path / 't.jsonl'}}}\n")
    assert main(["sweep", str(cfg), "--lrs", "1e-4,oops"]) == 2
    assert capsys.readouterr().err.strip() == "qolora sweep: error: --lrs: 'oops' is not a float"
    assert main(["sweep", str(cfg), "--lrs", "1e-4,-1"]) == 2
    assert capsys.readouterr().err.strip() == "qolora sweep: error: --lrs: -1.0 is out of range"
    assert main(["sweep", str(cfg), "--inits", "corda"]) == 2
    assert "--inits: expected olora, pissa, loftq, lora (olora-t4, loftq-t4, pissa-niter4), got 'corda'" in (
        capsys.readouterr().err
    )
    assert main(["sweep", str(cfg), "--inits", "pissa-t2"]) == 2
    assert "--inits pissa-t2: init_iters: 2 rounds are for olora and loftq; pissa has none" in capsys.readouterr().err
