"""End-to-end training on a tiny model: outputs, errors before training, exact resume after kill -9."""

from __future__ import annotations

import json

import pytest
import torch

import qolora
import qolora.config
from qolora.training import DataError, train

from .conftest import assert_resume_after_kill_9_is_exact, logits
from .conftest import tiny_train_config as _cfg


def test_train_writes_outputs_and_learns(chat_model_dir, tmp_path) -> None:
    cfg = _cfg(chat_model_dir, tmp_path, max_steps=8, save_steps=4, eval_steps=8)
    adapter = train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "loss.png", "initial_adapter/qolora.json", "adapter/qolora.json"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert [h["step"] for h in m["history"]] == list(range(1, 9))
    assert m["eval"][0]["step"] == 0 and m["eval"][-1]["step"] == 8
    assert m["eval"][-1]["eval_loss"] < m["eval"][0]["eval_loss"]
    assert m["tokens_seen"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_bytes"]["cpu_peak_rss"] > 0
    assert m["init_report"]["sources"] == {"checkpoint": 14}
    for d in ("initial_adapter", "adapter"):  # eval and export read these, not the run's config.yaml
        recorded = json.loads((run / d / "qolora.json").read_text())["data"]
        want = {"train": cfg.data.train, "template": "auto", "max_length": 32, "completion_only": True}
        assert recorded == {**want, "format": "prompt_completion"}  # the format as detected
    model = qolora.load_adapter(adapter, progress=False)
    assert torch.isfinite(logits(model, torch.tensor([[1, 7, 8, 9]]))).all()


def test_bad_data_fails_before_training(chat_model_dir, tmp_path) -> None:
    cfg = _cfg(chat_model_dir, tmp_path)
    with open(cfg.data.train, "a") as f:
        f.write(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match="train.jsonl row 25: field 'completion' is missing"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_report_to_tensorboard_writes_real_event_files(chat_model_dir, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(chat_model_dir, tmp_path, max_steps=4, save_steps=4, eval_steps=2, report_to="tensorboard"))
    events = list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under output_dir/runs/"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "eval/loss" in scalars and "train/learning_rate" in scalars
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())  # our own log is still written
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([h["loss"] for h in m["history"]])


def test_report_to_without_its_package_is_one_line_before_loading(chat_model_dir, tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"train.report_to=wandb: the wandb package is not installed; pip install"):
        train(_cfg(chat_model_dir, tmp_path, report_to="wandb"))
    assert not (tmp_path / "run").exists()


def test_packed_training_runs_and_counts_every_token(chat_model_dir, tmp_path) -> None:
    cfg = _cfg(chat_model_dir, tmp_path, max_steps=3, save_steps=3, eval_steps=3)
    cfg.data.packing = True
    train(cfg)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["eval"][-1]["eval_loss"] < m["eval"][0]["eval_loss"]
    assert m["tokens_seen"] > 3 * cfg.train.batch_size * 8  # packs of several examples, no padding counted


def test_group_by_length_uses_the_length_grouped_sampler(chat_model_dir, tmp_path, monkeypatch) -> None:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from qolora.training.trainer import QoloraTrainer

    seen = []
    real = QoloraTrainer._get_train_sampler

    def spy(self, *a, **k):  # noqa: ANN001
        sampler = real(self, *a, **k)
        seen.append(type(sampler))
        return sampler

    monkeypatch.setattr(QoloraTrainer, "_get_train_sampler", spy)
    cfg = _cfg(chat_model_dir, tmp_path, max_steps=2, save_steps=2, eval_steps=2)
    cfg.data.group_by_length = True
    train(cfg)
    assert seen and seen[0] is LengthGroupedSampler
    with pytest.raises(ValueError, match="data.group_by_length: packs have no padding"):
        qolora.config.config_from_dict({"data": {"train": "x.jsonl", "packing": True, "group_by_length": True}})


def test_existing_checkpoints_need_resume(chat_model_dir, tmp_path) -> None:
    cfg = _cfg(chat_model_dir, tmp_path, max_steps=2)
    train(cfg)
    with pytest.raises(ValueError, match="pass --resume"):
        train(cfg)


def test_resume_after_kill_9_matches_uninterrupted(chat_model_dir, tmp_path, monkeypatch) -> None:
    assert_resume_after_kill_9_is_exact(chat_model_dir, tmp_path, monkeypatch)


def test_training_prints_no_deprecation_warnings(chat_model_dir, tmp_path) -> None:
    """The demo's FutureWarnings (``gradient_checkpointing`` renamed in transformers 5) are gone."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(chat_model_dir, tmp_path, max_steps=2))
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [m for m in deprecated if "deprecated" in m.lower()], deprecated
