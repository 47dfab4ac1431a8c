"""Formats have one home (``training/formats.py``) and training and generate render prompts through
one function (``Encoder.prompt_ids``): for every format and template, generate's prompt ids are
the training example's ids up to its first trained token."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qolora.cli import main
from qolora.config import dump_config
from qolora.generate import ChatModel, _Streamer, prompt_ids
from qolora.training.data import check_row, detect_format
from qolora.training.formats import FORMATS
from qolora.training.losses import IGNORE
from qolora.training.tokenize import Encoder

from .conftest import make_tokenizer
from .conftest import tiny_train_config as _cfg

SYSTEM = "you are good"
ROWS = {  # a row per format, and the conversation that generate is given for it
    "chat": (
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "hello who are you"},
                {"role": "assistant", "content": "i can code"},
                {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": "yes"},
            ]
        },
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello who are you"}],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "human", "value": "what is python"},
                {"from": "gpt", "value": "python is code"},
            ]
        },
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what is python"}],
    ),
    "alpaca": (
        {"instruction": "what is a model", "input": "", "output": "a model is data"},
        [{"role": "user", "content": "what is a model"}],
    ),
    "prompt_completion": (
        {"prompt": "how do i train", "completion": "train it well"},
        [{"role": "user", "content": "how do i train"}],
    ),
    "text": ({"text": "the model is good and the data is fine"}, [{"role": "user", "content": "the model is good"}]),
    "preference": (
        {"prompt": "what is python", "chosen": "python is code", "rejected": "no"},
        [{"role": "user", "content": "what is python"}],
    ),
    "sharegpt_preference": (
        {
            "conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "hello who are you"}],
            "chosen": {"from": "gpt", "value": "i can code"},
            "rejected": {"from": "gpt", "value": "no"},
        },
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello who are you"}],
    ),
    "kto": (
        {"prompt": "how do i train", "completion": "train it well", "label": True},
        [{"role": "user", "content": "how do i train"}],
    ),
}


def test_every_format_is_covered_and_detected() -> None:
    assert set(ROWS) == set(FORMATS)
    for name, (row, _) in ROWS.items():
        assert detect_format("rows.jsonl", [row]) == name


@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_generate_prompt_is_the_training_example_up_to_its_first_trained_token(fmt, template) -> None:
    tok = make_tokenizer()
    row, conversation = ROWS[fmt]
    enc = Encoder(tok, 256, template)
    ex = enc.encode(check_row(row, fmt), fmt)
    first = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE)
    cm = ChatModel(model=None, tokenizer=tok, template=template, source="test", format=fmt)
    got = prompt_ids(cm, conversation)
    if fmt == "text":  # trained from its first token: the prompt is the text, continued
        want = enc.encode({"text": conversation[-1]["content"]}, "text")["input_ids"][:-1]  # without eos
    else:
        want = ex["input_ids"][:first]
        assert len(want) > 2
    assert got == want, (tok.decode(got), tok.decode(want))
    if fmt in ("alpaca", "prompt_completion"):  # one text prompt, as `qolora generate --prompt` passes it
        assert prompt_ids(cm, conversation[0]["content"]) == want


def test_alpaca_under_the_plain_template_is_prompted_with_its_wrapper() -> None:
    """The bug this fixed: generate tokenized an alpaca adapter's prompt raw, without ``### Instruction:``."""
    tok = make_tokenizer()
    cm = ChatModel(model=None, tokenizer=tok, template="plain", source="test", format="alpaca")
    from qolora.training.formats import alpaca_prompt

    wrapped = tok(alpaca_prompt("what is a model", ""), add_special_tokens=False)["input_ids"]
    raw = tok("what is a model", add_special_tokens=False)["input_ids"]
    got = prompt_ids(cm, "what is a model")
    assert got[-len(wrapped) :] == wrapped and len(got) > len(raw) + 4


def test_a_plain_chat_turn_trains_the_reply_not_its_role_label() -> None:
    tok = make_tokenizer()
    ex = Encoder(tok, 256, "plain").encode(check_row(ROWS["chat"][0], "chat"), "chat")
    trained = [t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != IGNORE]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert trained == ids("i can code\n") + ids("yes\n") + [tok.eos_token_id]


def test_sharegpt_is_checked_like_chat() -> None:
    from qolora.training.data import _row_error

    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}
    assert _row_error(bad, "sharegpt")[1] == (
        "field 'conversations[1].from' must be one of ['system', 'human', 'gpt'], got 'bot'"
    )
    assert _row_error({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt")[1] == (
        "field 'conversations' has no assistant turn to learn from"
    )


def test_sharegpt_trains_and_generates_end_to_end(chat_model_dir, tmp_path, capsys) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": f"what is {w}"}, {"from": "gpt", "value": f"{w} is good"}]}
        for w in ("python", "code", "data", "a model", "hello", "this") * 4
    ]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(chat_model_dir, tmp_path, max_steps=2)
    cfg.data.train = str(data)
    dump_config(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    adapter = Path(cfg.train.output_dir) / "adapter"
    assert json.loads((adapter / "qolora.json").read_text())["data"]["format"] == "sharegpt"
    capsys.readouterr()
    assert main(["generate", str(adapter), "--prompt", "what is python", "--greedy", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_an_adapter_without_a_recorded_format_falls_back_with_one_warning(adapter_without_format, caplog) -> None:
    from qolora.generate import load_chat_model

    with caplog.at_level("WARNING"):
        cm = load_chat_model(adapter_without_format)
    assert cm.format is None
    assert [r.message for r in caplog.records if "records no data format" in r.getMessage()]
    tok = cm.tokenizer
    # today's behaviour: a text is a prompt/completion row, a conversation a chat row
    assert prompt_ids(cm, "hello") == Encoder(tok, 64, cm.template).prompt_ids(
        [{"role": "user", "content": "hello"}], "prompt_completion"
    )


@pytest.fixture
def adapter_without_format(chat_model_dir, tmp_path) -> Path:
    from peft import LoraConfig

    import qolora
    from qolora import quant

    cfg = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora")
    model = qolora.get_qolora_model(quant.load_quantized(chat_model_dir), cfg, progress=False)
    return qolora.save_adapter(model, tmp_path / "adapter")  # qolora init's kind: no data recorded


class _ByteTokenizer:
    """Tokens: 0 "a", 1 " b", then the UTF-8 bytes of "€" (E2 82 AC) as byte-fallback tokens."""

    tokens = ["a", " b", "<0xE2>", "<0x82>", "<0xAC>"]

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def decode(self, ids, skip_special_tokens=True):
        out, pending = "", b""
        for i in ids:
            t = self.tokens[i]
            if t.startswith("<0x"):
                pending += bytes([int(t[3:5], 16)])
                continue
            out += pending.decode("utf-8", errors="replace") + t
            pending = b""
        return out + pending.decode("utf-8", errors="replace")


def test_the_streamer_holds_a_run_of_byte_fallback_tokens_until_it_ends() -> None:
    import torch

    out = io.StringIO()
    s = _Streamer(_ByteTokenizer(), out)
    s.put(torch.tensor([[0, 1]]))  # the prompt: never written
    shown = []
    for i in (0, 2, 3, 4, 1):
        s.put(torch.tensor([i]))
        shown.append(out.getvalue())
    s.end()
    # a run of byte tokens is held back until a token that is not one ends it (it might go on)
    assert shown == ["a", "a", "a", "a", "a€ b"]
    assert out.getvalue() == "a€ b\n"
    assert all(x == out.getvalue()[: len(x)] for x in shown)  # always a prefix of the reply
