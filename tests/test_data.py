"""Data formats, completion-only labels, bad rows, packing, collation."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from qolora.training.data import DataError, load_rows
from qolora.training.tokenize import IGNORE, Collator, Encoder, pack, split_rows

from .conftest import make_tokenizer


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = {
    "alpaca": [{"instruction": "what is python", "input": "", "output": "code"}],
    "chat": [
        {
            "messages": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi you"},
                {"role": "user", "content": "who are you"},
                {"role": "assistant", "content": "a model"},
            ]
        }
    ],
    "prompt_completion": [{"prompt": "how are you", "completion": "good thanks"}],
    "text": [{"text": "the model is good"}],
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_format_detection(tmp_path, fmt) -> None:
    rows = load_rows(_jsonl(tmp_path / "d.jsonl", ROWS[fmt]))
    assert rows.format == fmt and len(rows.rows) == 1


def test_other_file_types(tmp_path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(ROWS["prompt_completion"] * 3))
    assert len(load_rows(tmp_path / "d.json").rows) == 3
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS["alpaca"] * 2)
    assert load_rows(tmp_path / "d.csv").format == "alpaca"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS["text"] * 4), tmp_path / "d.parquet")
    assert len(load_rows(tmp_path / "d.parquet").rows) == 4
    from datasets import Dataset

    Dataset.from_list(ROWS["chat"] * 2).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(tmp_path / "saved").format == "chat"


@pytest.mark.parametrize(
    "row,msg",
    [
        ({"prompt": "how are you"}, "row 2: field 'completion' is missing"),
        ({"prompt": "how", "completion": 5}, "row 2: field 'completion' must be a string, got int"),
        ({"prompt": "how", "completion": "   "}, "row 2: field 'completion' is empty"),
        ("just a string", "row 2: row must be an object"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, msg) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS["prompt_completion"][0], row, ROWS["prompt_completion"][0]])
    with pytest.raises(DataError, match=msg) as e:
        load_rows(path)
    assert "bad.jsonl" in str(e.value)
    skipped = load_rows(path, skip_bad_rows=True)
    assert len(skipped.rows) == 2 and len(skipped.skipped) == 1


def test_bad_chat_rows_and_files(tmp_path) -> None:
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    with pytest.raises(DataError, match=r"row 1: field 'messages\[1\].role'"):
        load_rows(_jsonl(tmp_path / "c.jsonl", [bad]), "chat")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl row 2: not valid JSON"):
        load_rows(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match="cannot detect the format from fields"):
        load_rows(_jsonl(tmp_path / "u.jsonl", [{"question": "a", "answer": "b"}]))
    with pytest.raises(DataError, match="data file not found"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(_jsonl(tmp_path / "x.txt", [{"text": "a"}]))


def test_labels_are_ignore_exactly_on_prompt_tokens_plain() -> None:
    tok = make_tokenizer(chat=False)
    enc = Encoder(tok, max_length=64)
    ex = enc.encode({"prompt": "how are you", "completion": "good thanks"}, "prompt_completion")
    prompt = tok("how are you", add_special_tokens=False)["input_ids"]
    completion = tok("good thanks", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == [tok.bos_token_id] * (ex["input_ids"][0] == tok.bos_token_id) + prompt + completion + [
        tok.eos_token_id
    ]
    n_prompt = len(ex["input_ids"]) - len(completion) - 1
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == completion + [tok.eos_token_id]


def test_chat_template_trains_only_assistant_turns() -> None:
    tok = make_tokenizer()
    enc = Encoder(tok, max_length=128)
    ex = enc.encode(ROWS["chat"][0], "chat")
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    want = tok("hi you<|im_end|>\na model<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert trained == want
    assert tok.decode(ex["input_ids"]).count("<|im_start|>") == 4
    enc_all = Encoder(tok, max_length=128, completion_only=False)
    assert IGNORE not in enc_all.encode(ROWS["chat"][0], "chat")["labels"]


def test_alpaca_with_chat_template_and_plain() -> None:
    tok = make_tokenizer()
    chat = Encoder(tok, max_length=128).encode(ROWS["alpaca"][0], "alpaca")
    assert [t for t, lab in zip(chat["input_ids"], chat["labels"]) if lab != IGNORE] == tok(
        "code<|im_end|>\n", add_special_tokens=False
    )["input_ids"]
    plain = Encoder(tok, max_length=128, template="plain").encode(ROWS["alpaca"][0], "alpaca")
    assert [t for t, lab in zip(plain["input_ids"], plain["labels"]) if lab != IGNORE] == tok(
        "code", add_special_tokens=False
    )["input_ids"] + [tok.eos_token_id]


def test_truncation_and_no_target_rows_are_counted(tmp_path) -> None:
    tok = make_tokenizer(chat=False)
    rows = load_rows(
        _jsonl(
            tmp_path / "d.jsonl",
            [
                {"prompt": "how are you " * 10, "completion": "good"},  # prompt alone fills max_length
                {"prompt": "hi", "completion": "good thanks " * 10},  # completion truncated
                {"prompt": "hi", "completion": "fine"},
            ],
        )
    )
    enc = Encoder(tok, max_length=12)
    out = enc.encode_rows(rows)
    assert len(out) == 2 and all(len(x["input_ids"]) <= 12 for x in out)
    assert enc.stats.truncated == 2 and enc.stats.no_target == 1


def test_pack_split_and_collate() -> None:
    exs = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    # whole examples only: [1, 2, 3] and [4, 5] do not fit in 4 tokens together
    assert pack(exs, 4) == [
        {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 2]},
        {"input_ids": [4, 5], "labels": [IGNORE, 5], "position_ids": [0, 1]},
    ]
    assert pack(exs, 5) == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5], "position_ids": [0, 1, 2, 0, 1]}
    ]
    batch = Collator(pad_token_id=0)(exs)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, 5, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    from qolora.training.data import Rows

    tr, ev = split_rows(Rows("x", "text", [{"text": str(i)} for i in range(20)]), 0.1, seed=0)
    assert len(tr.rows) == 18 and len(ev.rows) == 2
    assert list(split_rows(Rows("x", "text", [{"text": str(i)} for i in range(20)]), 0.1, seed=0)[1].rows) == list(
        ev.rows
    )


def packing_matches_one_by_one(model: torch.nn.Module, rel: float, crossed: bool = True) -> dict[str, float]:
    """Check that a packed batch's loss on ``model`` (on its own device) equals its examples' run one
    by one, plain and chunked CE, within ``rel``, and (``crossed``) that without position_ids it
    would not: in bf16 the rounding is as large as the cross-example attention's effect.

    Returns:
        The largest relative gap seen, and the gap of the row that attends across examples.
    """
    from transformers import DataCollatorWithFlattening

    from qolora.training.losses import token_loss_sum

    device = next(model.parameters()).device
    torch.manual_seed(0)
    V = model.config.vocab_size
    exs = []
    for n in (7, 3, 12, 5, 9, 4):
        ids = torch.randint(3, V, (n,)).tolist()
        labels = [IGNORE, IGNORE, *ids[2:]] if n % 2 else ids  # completion-only and full-sequence examples
        exs.append({"input_ids": ids, "labels": labels})
    packs = pack(exs, 16)
    assert [len(p["input_ids"]) for p in packs] == [10, 12, 14, 4]
    batch = Collator(pad_token_id=0)(packs)
    # the layout transformers' flattening collator gives for the same examples (first labels ignored)
    ref = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)(exs, return_tensors="pt")
    for k in ("input_ids", "labels", "position_ids"):
        assert batch[k].tolist() == ref[k].tolist(), k
    assert "attention_mask" not in batch

    def on_device(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in b.items()}

    gap = 0.0
    for chunk in (None, 4):  # plain and chunked cross-entropy
        with torch.no_grad():
            total, count = token_loss_sum(model, on_device(batch), chunk)
            one = [token_loss_sum(model, on_device(Collator(pad_token_id=0)([ex])), chunk) for ex in exs]
        want_total, want_count = sum(float(t) for t, _ in one), sum(int(c) for _, c in one)
        assert int(count) == want_count
        assert float(total) / int(count) == pytest.approx(want_total / want_count, rel=rel)
        gap = max(gap, abs(float(total) - want_total) / want_total)
    # and it is the mask that does it: the same row without position_ids attends across examples
    with torch.no_grad():
        crossed_sum, _ = token_loss_sum(model, on_device({k: batch[k] for k in ("input_ids", "labels")}), chunk)
    crossed_gap = abs(float(crossed_sum) - want_total) / want_total
    assert crossed_gap > 20 * rel or not crossed
    return {"max_rel_gap": gap, "crossed_rel_gap": crossed_gap}


def test_packed_batch_loss_equals_its_examples_one_by_one(chat_model_dir) -> None:
    """No attention crosses an example: fp32, tolerance 1e-5 relative (summation order only)."""
    from transformers import AutoModelForCausalLM

    packing_matches_one_by_one(AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval(), 1e-5)


def test_tokenization_is_cached_by_data_tokenizer_and_settings(tmp_path, monkeypatch, caplog) -> None:
    import logging

    from qolora.training.tokenize import take

    tok = make_tokenizer(chat=False)
    path = _jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"how are you {i}", "completion": "good thanks"} for i in range(30)]
    )
    first = Encoder(tok, max_length=64).encode_rows(load_rows(path))
    assert first.cache_files and "qolora-tokens-" in first.cache_files[0]["filename"]  # memory-mapped Arrow

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(Encoder, "encode", no_tokenizing)
    with caplog.at_level(logging.INFO):
        enc = Encoder(tok, max_length=64)
        again = enc.encode_rows(load_rows(path))
    assert "tokenized cache used" in caplog.text
    assert take(again) == take(first) and enc.stats.rows == 30 and enc.stats.tokens == sum(again["length"])
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings: another cache entry
        Encoder(tok, max_length=16).encode_rows(load_rows(path))
    with open(path, "a") as f:  # other data: another cache entry
        f.write(json.dumps({"prompt": "new", "completion": "row"}) + "\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        Encoder(tok, max_length=64).encode_rows(load_rows(path))


def test_every_source_goes_through_datasets(tmp_path, monkeypatch) -> None:
    from datasets import Dataset

    rows = ROWS["prompt_completion"] * 3
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    arrow = Dataset.from_list(rows)
    arrow.save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "wrapped.json").write_text(json.dumps({"train": rows}))
    (tmp_path / "digits.csv").write_text("prompt,completion\n007,\n1,2\n")
    for src in ("d.parquet", "saved", str(arrow_file.relative_to(tmp_path)), "wrapped.json"):
        got = load_rows(tmp_path / src)
        assert got.format == "prompt_completion" and not isinstance(got.rows, list), src
        assert list(got.rows) == rows, src
    # csv cells stay strings as written ("007" is not 7), and an empty cell is an empty field, not NaN
    with pytest.raises(DataError, match="digits.csv row 1: field 'completion' is empty"):
        load_rows(tmp_path / "digits.csv")
    assert list(load_rows(tmp_path / "digits.csv", skip_bad_rows=True).rows) == [{"prompt": "1", "completion": "2"}]
    # a hub id is looked up in the local HF cache only
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="not a dataset id in the local HF cache"):
        load_rows("someone/not-cached-dataset")


def test_a_list_of_sources_with_row_caps_and_fractions(tmp_path) -> None:
    from qolora.config import ConfigError, config_from_dict
    from qolora.training.data import load_sources

    pc = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    al = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(10)]
    chat = [
        {"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(4)
    ]
    a, b, c = _jsonl(tmp_path / "a.jsonl", pc), _jsonl(tmp_path / "b.jsonl", al), _jsonl(tmp_path / "c.jsonl", chat)
    same = load_sources([{"path": a, "max_rows": 3}, a])
    assert same.format == "prompt_completion" and list(same.rows)[:4] == pc[:3] + pc[:1] and len(same.rows) == 13
    mixed = load_sources([{"path": a, "max_rows": 4}, {"path": b, "fraction": 0.5}, c], seed=1)
    assert mixed.format == "chat" and len(mixed.rows) == 4 + 5 + 4
    msgs = [r["messages"] for r in mixed.rows]
    assert msgs[0] == [{"role": "user", "content": "p0"}, {"role": "assistant", "content": "c0"}]
    picked = [m[0]["content"] for m in msgs[4:9]]
    assert picked == sorted(picked, key=lambda t: int(t[1:])) and all(
        t.startswith("i") for t in picked
    )  # in file order
    assert msgs[9:] == [r["messages"] for r in chat]
    assert [r["instruction"] for r in load_sources([{"path": b, "fraction": 0.5}], seed=1).rows] == picked  # seeded
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "plain text"}])
    with pytest.raises(DataError, match="cannot mix text rows"):
        load_sources([a, text])
    base = {"model": "m", "data": {"train": None}}
    for bad, msg in [
        ({"path": a, "rows": 3}, r"data.train\[0\].rows: unknown key"),
        ({"path": a, "fraction": 1.5}, r"data.train\[0\].fraction: must be in \(0, 1\]"),
        ({"path": a, "max_rows": 0}, r"data.train\[0\].max_rows: must be an integer >= 1"),
        ({"max_rows": 2}, r"data.train\[0\].path: required"),
    ]:
        base["data"]["train"] = [bad]
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(base)
