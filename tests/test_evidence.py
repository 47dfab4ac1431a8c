"""qolora eval (learn/forget) and qolora compare on a tiny model."""

from __future__ import annotations

import json

from qolora.cli import main
from qolora.training import Encoder, train
from qolora.training.compare import compare, summarize
from qolora.training.evaluate import evaluate

from .conftest import tiny_train_config


def _source(tmp_path) -> str:
    rows = [{"text": "the answer is good and the code is fine"}, {"text": "hello who are you my name is model"}]
    p = tmp_path / "source.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    return str(p)


def test_eval_learn_and_forget(chat_model_dir, tmp_path, capsys, monkeypatch) -> None:
    cfg = tiny_train_config(chat_model_dir, tmp_path, max_steps=10, eval_steps=10, save_steps=10)
    adapter = train(cfg)
    (adapter.parent / "config.yaml").unlink()  # the data settings come from qolora.json
    import qolora.training.evaluate as ev

    lengths = []
    monkeypatch.setattr(ev, "Encoder", lambda tok, n, *a: lengths.append(n) or Encoder(tok, n, *a))
    result = evaluate(adapter, cfg.data.train, _source(tmp_path), batch_size=4)
    assert lengths == [32, 32]
    assert result["tuned_target"]["loss"] < result["base_target"]["loss"]
    assert result["learn"] == result["base_target"]["loss"] - result["tuned_target"]["loss"] > 0
    assert result["forget"] == result["tuned_source"]["loss"] - result["base_source"]["loss"]
    assert result["base_target"]["tokens"] == result["tuned_target"]["tokens"] > 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(adapter), "--data", cfg.data.train, "--out", str(out)]) == 0
    assert "learn" in capsys.readouterr().out
    assert json.loads(out.read_text())["learn"] > 0


def test_compare_runs_each_init_and_reuses_finished_runs(chat_model_dir, tmp_path, monkeypatch) -> None:
    cfg = tiny_train_config(chat_model_dir, tmp_path, max_steps=4, eval_steps=4, save_steps=4)
    summary = compare(cfg, ["olora", "lora"], [2, 4], tmp_path / "cmp")
    assert set(summary["runs"]) == {"olora-r2", "lora-r2", "olora-r4", "lora-r4"}
    for r in summary["runs"].values():
        assert r["final_eval_loss"] is not None and r["steps_to_target"] is not None
    assert (tmp_path / "cmp" / "compare.png").is_file()
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["runs"].keys() == summary["runs"].keys()
    cfg_r4 = json.loads((tmp_path / "cmp" / "olora-r4" / "adapter" / "adapter_config.json").read_text())
    assert cfg_r4["r"] == 4 and cfg_r4["lora_alpha"] == 4  # alpha/r kept from the config (4/4)

    def fail(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("qolora.training.run.train", fail)
    assert compare(cfg, ["olora", "lora"], [2, 4], tmp_path / "cmp")["runs"].keys() == summary["runs"].keys()


def test_summarize_steps_to_target() -> None:
    runs = {
        "fast": {"history": [{"step": s, "loss": 3.0 - 0.5 * s} for s in range(1, 5)], "eval": []},
        "slow": {"history": [{"step": s, "loss": 3.0 - 0.2 * s} for s in range(1, 5)], "eval": []},
    }
    s = summarize(runs, target_loss=2.7)  # EMA: fast reaches it at step 1, slow at step 3
    assert (s["runs"]["fast"]["steps_to_target"], s["runs"]["slow"]["steps_to_target"]) == (1, 3)
    assert s["runs"]["slow"]["loss_at_step"]["4"] == 3.0 - 0.8


def test_completion_loss_is_token_weighted_transformers_loss(chat_model_dir, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from qolora.training.data import load_rows
    from qolora.training.evaluate import completion_loss
    from qolora.training.run import load_tokenizer
    from qolora.training.tokenize import Collator, Encoder, take

    cfg = tiny_train_config(chat_model_dir, tmp_path)
    tok = load_tokenizer(str(chat_model_dir))
    ex = take(Encoder(tok, 32).encode_rows(load_rows(cfg.data.train)), 0, 6)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32)
    batch = Collator(tok.pad_token_id)(ex)
    with torch.no_grad():
        want = model(**batch).loss.item()  # one batch: transformers' mean over target tokens
    got = completion_loss(model, ex, tok.pad_token_id, batch_size=len(ex))
    assert abs(got.loss - want) < 1e-5
    assert abs(completion_loss(model, ex, tok.pad_token_id, batch_size=4).loss - want) < 1e-5  # batching-invariant
