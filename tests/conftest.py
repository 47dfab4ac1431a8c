"""Tiny random models built in fixtures; nothing is downloaded."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _llama(outlier_cols: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg)
    if outlier_cols:
        # LLM-like weights: a few input channels with ~20x larger magnitude (LLM.int8, Dettmers 2022).
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "proj" in name:
                    cols = torch.randperm(p.shape[1], generator=g)[:3]
                    p[:, cols] *= 20.0
    return model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64) saved as a plain HF folder with safetensors."""
    d = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def outlier_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``llama_dir``, with outlier input columns in every projection."""
    d = tmp_path_factory.mktemp("llama_outliers")
    _llama(outlier_cols=True).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, fan_in_fan_out) saved as a plain HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(99)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(d)
    return d


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


WORDS = (
    "the a what is who are you how do i can my your it this that to of and in hello hi "
    "yes no thanks good bad name python code model data train answer question fine well"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat: bool = True):
    """A word-level tokenizer built in memory: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + list("?!.,:#\n"))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _save_tiny_llama(d: Path, tok, seed: int) -> Path:
    """A tiny Llama (4 heads, 2 kv heads) sized to ``tok``, saved with it as a plain HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a word-level tokenizer and a chat template, as a plain HF folder."""
    return _save_tiny_llama(tmp_path_factory.mktemp("chat_model"), make_tokenizer(), 4321)


def tiny_data(tmp_path, n: int = 24) -> str:
    words = ["hello", "hi", "good", "fine", "thanks", "yes", "no", "python", "code", "model"]
    rows = [
        {"prompt": f"what is {words[i % 10]}", "completion": f"{words[(i * 3) % 10]} {words[(i * 7) % 10]}"}
        for i in range(n)
    ]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def tiny_train_config(model_dir, tmp_path, **train_kw):
    train_cfg = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 6,
        "batch_size": 2,
        "lr": 1e-2,
        "save_steps": 2,
        "eval_steps": 3,
        "logging_steps": 1,
        "save_total_limit": 5,
        **train_kw,
    }
    from qolora.config import config_from_dict

    return config_from_dict(
        {
            "model": str(model_dir),
            "adapter": {"r": 4, "alpha": 4},
            "data": {"train": tiny_data(tmp_path), "max_length": 32, "eval_fraction": 0.2},
            "train": train_cfg,
        }
    )


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a Python subprocess: this checkout first on PYTHONPATH, and the caller's
    PYTHONPATH kept (the GPU machine's carried wheels live there)."""
    import os

    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def add_trainer_callback(monkeypatch, callback) -> None:
    """Make ``qolora.training.run.train`` add ``callback`` to the Trainer it builds, for any method."""
    import qolora.training.run as run

    for name in ("build_trainer", "build_preference_trainer"):
        build = getattr(run, name)

        def build_with_callback(*a, _build=build, **k):
            trainer = _build(*a, **k)
            trainer.add_callback(callback)
            return trainer

        monkeypatch.setattr(run, name, build_with_callback)


def assert_same_state(ours: torch.nn.Module, ref: torch.nn.Module, n_lora: int, tol: float = 1e-5) -> None:
    """Every tensor of ``ours`` within ``tol`` of ``ref``'s (a PEFT reference), ``n_lora`` of them LoRA factors."""
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for k, v in ref_sd.items():
        assert (ours_sd[k] - v).abs().max() <= tol, k
    assert sum("lora_" in k for k in ref_sd) == n_lora


def perturb_lora_(model: torch.nn.Module, scale: float = 0.01) -> torch.nn.Module:
    """Move every LoRA weight away from its init, as training would."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture
def base_copy(llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of ``llama_dir`` that a test may modify."""
    import shutil

    d = tmp_path / "base"
    shutil.copytree(llama_dir, d)
    return d


def make_bpe_tokenizer():
    """A tiny Llama-2-style BPE tokenizer (byte fallback, "▁" for spaces), built in memory.

    llama.cpp's converter takes this kind (its LlamaHfVocab path) without a known pre-tokenizer
    hash, which a made-up byte-level BPE would need.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for ch in ["▁", *sorted(set("".join(WORDS)))]:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for w in WORDS:
        cur = "▁"
        for ch in w:
            merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=list(dict.fromkeys(merges)), unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    chat = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # the last: Qwen2's tokenizer class adds it if missing
    pad = [f"<|reserved_{i}|>" for i in range(-(len(tk.get_vocab()) + 2) % 64)]  # 64 | vocab: bitsandbytes' kernels
    tok.add_special_tokens({"additional_special_tokens": chat + pad})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a BPE tokenizer and a chat template: what GGUF export needs."""
    return _save_tiny_llama(tmp_path_factory.mktemp("bpe_model"), make_bpe_tokenizer(), 99)


# A training run that kill -9s itself right after saving checkpoint-4 (argv[1]: its config).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import qolora.training.run as run
    from qolora.config import load_config

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

    build = run.build_trainer
    def build_with_kill(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(KillAfterSave())
        return trainer
    run.build_trainer = build_with_kill
    run.train(load_config(sys.argv[1]))
""")


def killed_after_checkpoint_4(cfg, kill_dir, killer: str = KILLER) -> None:
    """Run ``cfg`` in a subprocess (``killer``) that kill -9s itself right after saving checkpoint-4."""
    import subprocess
    import sys

    from qolora.config import dump_config

    dump_config(cfg, kill_dir / "cfg.yaml")
    (kill_dir / "killer.py").write_text(killer)
    proc = subprocess.run(
        [sys.executable, str(kill_dir / "killer.py"), str(kill_dir / "cfg.yaml")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (kill_dir / "run" / "checkpoint-4").is_dir() and not (kill_dir / "run" / "adapter").exists()


def assert_resume_after_kill_9_is_exact(model_dir, tmp_path, monkeypatch) -> dict:
    """Train 7 steps; train again, killed with kill -9 after checkpoint-4, then ``resume``: steps 5-7
    run (continued, not restarted) and every logged loss equals the uninterrupted run's. Returns the
    uninterrupted run's metrics."""
    from transformers import TrainerCallback

    from qolora.training import train

    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir()
    kill_dir.mkdir()
    train(tiny_train_config(model_dir, ref_dir, max_steps=7))
    metrics = json.loads((ref_dir / "run" / "metrics.json").read_text())
    cfg = tiny_train_config(model_dir, kill_dir, max_steps=7)
    killed_after_checkpoint_4(cfg, kill_dir)
    steps_run = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps_run.append(state.global_step)

    add_trainer_callback(monkeypatch, Count())
    train(cfg, resume=True)
    assert steps_run == [5, 6, 7]  # continued, not restarted
    got = json.loads((kill_dir / "run" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in got] == list(range(1, 8))
    assert [h["loss"] for h in got] == [h["loss"] for h in metrics["history"]]
    return metrics
