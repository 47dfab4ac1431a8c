"""Bad inputs, one table: each is exactly one line on stderr, exit code 2, no traceback, and no
output that looks complete. Cases run in-process through ``qolora.cli.main`` (an exception it
does not turn into that line fails the test); ``test_real_process_stderr`` checks the real
process's stderr for two of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig

import qolora
from qolora import quant
from qolora.cli import main

from .conftest import tiny_data


@pytest.fixture(scope="module")
def adapter_src(tmp_path_factory: pytest.TempPathFactory, chat_model_dir: Path) -> Path:
    """An OLoRA adapter dir on a private copy of the base: (base/, adapter/)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(chat_model_dir, root / "base")
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora")
    qolora.save_adapter(
        qolora.get_qolora_model(quant.load_quantized(root / "base"), cfg, progress=False), root / "adapter"
    )
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, chat_model_dir: Path) -> Path:
    """A config whose output_dir holds a checkpoint (for --resume cases)."""
    root = tmp_path_factory.mktemp("run_for_resume")
    cfg = _config(chat_model_dir, root, train={"max_steps": 2, "save_steps": 2})
    assert main(["train", str(cfg)]) == 0
    return cfg


def _config(model: Path | str, root: Path, **sections: dict) -> Path:
    data = {"train": tiny_data(root), "max_length": 32, "eval_fraction": 0.2, **sections.pop("data", {})}
    train = {
        "output_dir": str(root / "run"),
        "max_steps": 2,
        "batch_size": 2,
        "save_steps": 2,
        "eval_steps": 2,
        "logging_steps": 1,
        **sections.pop("train", {}),
    }
    cfg = {
        "model": str(model),
        "adapter": {"r": 4, "alpha": 4, **sections.pop("adapter", {})},
        "data": data,
        "train": train,
        **sections,
    }
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _copy_adapter(src: Path, root: Path) -> Path:
    shutil.copytree(src / "adapter", root / "adapter")
    return root / "adapter"


def _append(path: str, text: str) -> str:
    with open(path, "a") as f:
        f.write(text)
    return path


# Each case: (id, build(tmp_path, fixtures) -> argv, expected message part). Fixtures: chat model
# dir, adapter source root, finished run config.
Case = tuple[str, Callable[..., list[str]], str]


def _train(root, chat, **sections) -> list[str]:
    return ["train", str(_config(chat, root, **sections))]


def _bad_row(root, chat, *_):
    cfg = _config(chat, root)
    _append(yaml.safe_load(cfg.read_text())["data"]["train"], json.dumps({"prompt": "hi"}) + "\n")
    return ["train", str(cfg)]


def _broken_json(root, chat, *_):
    cfg = _config(chat, root)
    _append(yaml.safe_load(cfg.read_text())["data"]["train"], '{"prompt": "hi", \n')
    return ["train", str(cfg)]


def _empty_file(root, chat, *_):
    (root / "empty.jsonl").write_text("")
    return _train(root, chat, data={"train": str(root / "empty.jsonl")})


def _no_trainable_eval(root, chat, *_):
    long = " ".join(["hello"] * 60)
    (root / "eval.jsonl").write_text(json.dumps({"prompt": long, "completion": "yes"}) + "\n")
    return _train(root, chat, data={"eval": str(root / "eval.jsonl")})


def _no_config_json(root, chat, *_):
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "tokenizer.json").write_text("{}")
    return _train(root, root / "not_a_model")


def _hub_id_offline(root, chat, *_):
    return _train(root, "someone/uncached-model-7b")


def _resume_changed(root, chat, adapter, run_cfg):
    return ["train", str(run_cfg), "adapter.r=8", "quant.double_quant=false", "--resume"]


def _no_resume(root, chat, adapter, run_cfg):
    return ["train", str(run_cfg)]


def _empty_weights(root, chat, src, *_):
    a = _copy_adapter(src, root)
    (a / "adapter_model.safetensors").write_bytes(b"")
    return ["export", "merged", str(a), str(root / "out")]


def _truncated_weights(root, chat, src, *_):
    a = _copy_adapter(src, root)
    data = (a / "adapter_model.safetensors").read_bytes()
    (a / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return ["export", "merged", str(a), str(root / "out")]


def _factors_missing_layer(root, chat, src, *_):
    from safetensors.torch import load_file, save_file

    a = _copy_adapter(src, root)
    f = load_file(str(a / "initial_factors.safetensors"))
    save_file({k: v for k, v in f.items() if "layers.1.mlp.down_proj" not in k}, str(a / "initial_factors.safetensors"))
    return ["export", "merged", str(a), str(root / "out")]


def _base_changed(root, chat, src, *_):
    a = _copy_adapter(src, root)
    base = root / "base"
    shutil.copytree(src / "base", base)
    _append(str(base / "model.safetensors"), "x")
    return ["export", "merged", str(a), str(root / "out"), "--checkpoint", str(base)]


def _factors_missing_layer_on_load(root, chat, src, *_):
    args = _factors_missing_layer(root, chat, src)
    (root / "d.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "yes"}) + "\n")
    return ["eval", args[2], "--data", str(root / "d.jsonl")]


CASES: list[Case] = [
    ("bad row", _bad_row, "train.jsonl row 25: field 'completion' is missing"),
    ("broken json", _broken_json, "train.jsonl row 25: not valid JSON"),
    ("empty file", _empty_file, "empty.jsonl: no rows"),
    ("unknown override", lambda r, c, *_: _train(r, c) + ["train.speed=3"], "train.speed: unknown key"),
    ("bad lr", lambda r, c, *_: _train(r, c, train={"lr": -1.0}), "train.lr: must be > 0"),
    ("unknown init", lambda r, c, *_: _train(r, c, adapter={"init": "corda"}), "adapter.init: expected one of"),
    (
        "unknown target",
        lambda r, c, *_: _train(r, c, adapter={"target_modules": ["qkv"]}),
        "adapter.target_modules: ['qkv'] matches no layer",
    ),
    (
        "rank too large",
        lambda r, c, *_: _train(r, c, adapter={"r": 100000}),
        "adapter.r: rank 100000 exceeds min(out, in) = 32 of model.layers.0.self_attn.k_proj",
    ),
    ("folder without config.json", _no_config_json, "not_a_model holds no config.json"),
    ("hub id not cached", _hub_id_offline, "'someone/uncached-model-7b' is not a local folder and not in the local"),
    ("eval file without a trainable token", _no_trainable_eval, "eval.jsonl: no example has a target token left"),
    ("missing config file", lambda r, *_: ["train", str(r / "nope.yaml")], "nope.yaml not found"),
    ("resume with changed settings", _resume_changed, "--resume: quant.double_quant, adapter.r changed"),
    ("existing run without --resume", _no_resume, "already has checkpoint-2; pass --resume"),
    ("empty adapter weights", _empty_weights, "adapter_model.safetensors is empty"),
    ("truncated adapter weights", _truncated_weights, "adapter_model.safetensors is not a complete safetensors file"),
    (
        "initial factors missing a layer",
        _factors_missing_layer,
        "initial_factors.safetensors: no initial factors for 1 adapter layers (first: model.layers.1.mlp.down_proj)",
    ),
    (
        "initial factors missing a layer (load)",
        _factors_missing_layer_on_load,
        "initial_factors.safetensors: no initial factors for 1 adapter layers (first: model.layers.1.mlp.down_proj)",
    ),
    ("base changed since init", _base_changed, "base checkpoint does not match"),
    ("adapter dir missing", lambda r, *_: ["export", "lora", str(r / "nope"), str(r / "out")], "nope does not exist"),
]


@pytest.mark.parametrize("build,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(
    build, message, tmp_path, chat_model_dir, adapter_src, finished_run, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    argv = build(tmp_path, chat_model_dir, adapter_src, finished_run)
    capsys.readouterr()
    assert main(argv) == 2
    bars = ("%|", " examples/s]")  # tqdm bars with and without a known total (datasets' conversion)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not any(b in line for b in bars)]
    assert len(err) == 1, err  # progress bars aside
    assert err[0].startswith(f"qolora {argv[0]}: error: ") and message in err[0], err[0]
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "out").exists()


def test_real_process_stderr(tmp_path, chat_model_dir) -> None:
    """The real command: stderr is the one error line, nothing else, for errors found before loading."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf_cache")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for argv, message in (
        (_train(tmp_path / "a", chat_model_dir, adapter={"r": 100000}), "adapter.r: rank 100000"),
        (_hub_id_offline(tmp_path / "b", chat_model_dir), "not in the local Hugging Face cache"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "qolora.cli", *argv], capture_output=True, text=True, env=env, timeout=300
        )
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
        assert p.stderr.startswith("qolora train: error: ")
