"""``qolora generate`` and ``qolora chat``: the exact QOLoRA model or a merged folder, streamed, scriptable."""

from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig

import qolora
from qolora import quant
from qolora.cli import main
from qolora.export import export_merged
from qolora.generate import generate, load_chat_model, prompt_ids

from .conftest import child_env, perturb_lora_


@pytest.fixture(scope="module")
def adapter(bpe_model_dir, tmp_path_factory):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="olora")
    model = perturb_lora_(qolora.get_qolora_model(quant.load_quantized(bpe_model_dir), cfg, progress=False), 0.2)
    return qolora.save_adapter(model, tmp_path_factory.mktemp("gen") / "adapter")


def _greedy_reference(cm, prompt, n):
    """What transformers' own greedy decoding gives for the same prompt ids, without our streamer."""
    ids = torch.tensor([prompt_ids(cm, prompt)])
    with torch.no_grad():
        out = cm.model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return cm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_streams_the_exact_models_greedy_reply(adapter, capsys) -> None:
    cm = load_chat_model(adapter)
    assert cm.template == "chat"  # the tokenizer has a chat template and nothing recorded says otherwise
    ids = prompt_ids(cm, "hello world")
    tail = cm.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids  # the generation prompt
    assert ids[-len(tail) :] == tail and ids.count(cm.tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1
    want = _greedy_reference(cm, "hello world", 8)
    assert want.strip()
    assert main(["generate", str(adapter), "--prompt", "hello world", "--greedy", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    # sampling: seeded, so reproducible; and different seeds may differ (not asserted: tiny vocab)
    a = generate(cm, "hello world", max_new_tokens=8, seed=3)
    assert a == generate(cm, "hello world", max_new_tokens=8, seed=3)


def test_merged_folder_gives_the_same_greedy_reply(adapter, tmp_path) -> None:
    merged = export_merged(adapter, tmp_path / "merged", dtype="float32", progress=False).out_dir
    exact, plain = load_chat_model(adapter), load_chat_model(merged)
    assert "merged model" in plain.source
    assert generate(plain, "the quick fox", max_new_tokens=8, greedy=True) == generate(
        exact, "the quick fox", max_new_tokens=8, greedy=True
    )


def test_chat_reads_turns_from_stdin_and_reset_clears_history(adapter, monkeypatch, capsys) -> None:
    cm = load_chat_model(adapter)
    first = generate(cm, [{"role": "user", "content": "hello"}], max_new_tokens=6, greedy=True)
    fresh = generate(cm, [{"role": "user", "content": "lazy dog"}], max_new_tokens=6, greedy=True)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/reset\nlazy dog\n/exit\nnever read\n"))
    assert main(["chat", str(adapter), "--greedy", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"{first}\n{fresh}\n"  # after /reset the second turn has no history


def test_generate_refusals_are_one_line(tmp_path, capsys, adapter) -> None:
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither an adapter dir" in err[0]
    assert main(["generate", str(adapter), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens: must be >= 1" in capsys.readouterr().err


def test_stdout_carries_only_the_reply_in_a_real_process(adapter) -> None:
    """``qolora generate ... > reply.txt`` and ``qolora chat`` through a pipe: stdout is the model's
    text alone; the log lines (there are some) go to stderr."""
    import subprocess
    import sys

    cm = load_chat_model(adapter)
    env = child_env()
    cmd = [sys.executable, "-m", "qolora"]
    args = ["--greedy", "--max-new-tokens", "6"]
    gen = subprocess.run(
        [*cmd, "generate", str(adapter), "--prompt", "hello world", *args], env=env, capture_output=True, text=True
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout == generate(cm, "hello world", max_new_tokens=6, greedy=True) + "\n"
    assert "INFO qolora" in gen.stderr
    chat = subprocess.run(
        [*cmd, "chat", str(adapter), *args], input="hello\n/exit\n", env=env, capture_output=True, text=True
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout == generate(cm, [{"role": "user", "content": "hello"}], max_new_tokens=6, greedy=True) + "\n"
    assert "INFO qolora" in chat.stderr
