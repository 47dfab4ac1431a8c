"""The ``qolora`` command: init writes a loadable adapter; bad input is one clear line."""

from __future__ import annotations

import torch

import qolora
from qolora.cli import main

from .conftest import logits


def test_cli_init_writes_loadable_adapter(llama_dir, tmp_path, tokens, capsys) -> None:
    assert main(["init", str(llama_dir), str(tmp_path / "a"), "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "rel_err" in out and "adapter written to" in out
    model = qolora.load_adapter(tmp_path / "a", progress=False)
    assert model.peft_config["default"].r == 4
    assert torch.isfinite(logits(model, tokens)).all()


def test_cli_errors_are_one_line(tmp_path, llama_dir, capsys) -> None:
    assert main(["init", str(tmp_path / "missing"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qolora init: error:") and "missing" in err and "Traceback" not in err
    assert main(["init", str(llama_dir), str(tmp_path / "a"), "--r", "500"]) == 2
    assert "exceeds min" in capsys.readouterr().err


def test_cli_train_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: {train: t.jsonl}\ntrain: {lr: fast}\n")
    assert main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == "qolora train: error: train.lr: expected float or 'auto', got 'fast'"
    assert main(["train", str(cfg), "train.lr=1e-4", "train.epochs=0"]) == 2
    assert "train.epochs: must be > 0" in capsys.readouterr().err
