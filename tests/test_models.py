"""The architecture matrix: every family of ``tests/model_matrix.py`` through ``qolora train`` (a 4-bit
base with every linear 4-bit, the init on all-linear, the loss check, a few steps), a bit-identical
reload, a merged export that plain transformers loads, GGUF through llama.cpp's converter, and generate.
The README's "Supported models" table is generated from the same matrix (``supported_table``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import qolora
from qolora import quant
from qolora.export.gguf import export_gguf, llama_cpp_dir
from qolora.generate import generate, load_chat_model, prompt_ids
from qolora.quant.loading import full_precision_linears
from qolora.training.run import train

from .conftest import add_trainer_callback, make_bpe_tokenizer, tiny_train_config
from .model_matrix import FAMILIES, build

PROBE = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(5))

# The converter as pinned, but a BPE pre-tokenizer it does not know (ours: built in memory; a real
# model's has its known hash) is taken as GPT-2's: the model's tensors and config are what is tested.
_ANY_BPE = """import runpy, sys
sys.path.insert(0, {real!r})
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def converter(tmp_path_factory):
    try:
        real = llama_cpp_dir(fetch=False)
    except FileNotFoundError as e:
        pytest.skip(f"{e}: scripts/setup.sh fetches it; the suite downloads nothing")
    d = tmp_path_factory.mktemp("converter")
    (d / "conversion").symlink_to(real / "conversion")
    (d / "gguf-py").symlink_to(real / "gguf-py")
    script = str(real / "convert_hf_to_gguf.py")
    (d / "convert_hf_to_gguf.py").write_text(_ANY_BPE.format(real=str(real), script=script))
    return d


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A sentencepiece ``tokenizer.model`` trained on the test words, for the families whose
    converter reads one (``Family.spm``)."""
    import sentencepiece as spm

    from .conftest import WORDS

    d = tmp_path_factory.mktemp("spm")
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "sp"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return d / "sp.model"


class _Capture(TrainerCallback):
    """The trained model's logits on ``PROBE`` when training ends (before the adapter is written)."""

    def on_train_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=PROBE).logits.clone()


def _linears(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if quant.is_4bit(m)}


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_trains_reloads_exports_and_generates(
    family, tokenizer, spm_model, converter, tmp_path, monkeypatch
) -> None:
    model_dir = tmp_path / "model"
    build(family, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if family.spm:
        shutil.copy(spm_model, model_dir / "tokenizer.model")

    # every linear the quantization config covers is 4-bit (Falcon's nn.Linear subclass too)
    base = quant.load_quantized(model_dir)
    assert full_precision_linears(base, {"lm_head"}) == []
    four_bit = _linears(base)
    assert len(four_bit) >= 8
    del base

    cfg = tiny_train_config(model_dir, tmp_path, max_steps=3, save_steps=10, eval_steps=3, lr=1e-3)
    cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.target_modules = 8, 8, "all-linear"
    capture = _Capture()
    add_trainer_callback(monkeypatch, capture)
    adapter = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())

    # the init: every 4-bit linear factored from the checkpoint, closer to W than plain QLoRA
    report = metrics["init_report"]
    assert {x["name"] for x in report["layers"]} == four_bit and report["sources"] == {"checkpoint": len(four_bit)}
    ratio = sum(x["rel_err"] / x["qlora_rel_err"] for x in report["layers"]) / len(report["layers"])
    assert ratio < 1.0, ratio
    # the loss: the chunked CE where it runs, checked against the model's own (fp32, 1e-5)
    check = metrics.get("loss_check")
    if check is not None:
        assert check["ok"] and abs(check["chunked"] - check["own"]) <= 1e-5 * max(1.0, abs(check["own"])), check
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    # reload: bit-identical logits, no QR
    model = qolora.load_adapter(adapter)
    model.eval()
    with torch.no_grad():
        reloaded = model(input_ids=PROBE).logits
    assert torch.equal(reloaded, capture.logits)

    # merged export, loaded by plain transformers: the trained model up to fp16 rounding
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    qolora.export_merged(adapter, merged, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert not hasattr(plain.config, "quantization_config")
    with torch.no_grad():
        got = plain(input_ids=PROBE).logits
    agree = (got.argmax(-1) == reloaded.argmax(-1)).float().mean()
    assert agree >= 0.95 and (got - reloaded).abs().max() < 2e-2, (float(agree), float((got - reloaded).abs().max()))

    # GGUF through llama.cpp's converter: every tensor of the merged export is in it
    res = export_gguf(adapter, tmp_path / "m.gguf", llama_cpp=converter, progress=False)
    keys = [k for f in merged.glob("*.safetensors") for k in load_file(f)]
    n_merged = len({re.sub(r"\.experts\.\d+\.", ".experts.", k) for k in keys})  # llama.cpp stacks the experts
    assert res.path.is_file() and res.tensors >= n_merged - 1, (res.tensors, n_merged)  # rotary caches aside

    # generate: the greedy first token is the trained model's argmax after the prompt
    cm = load_chat_model(adapter)
    ids = torch.tensor([prompt_ids(cm, "hello")])
    with torch.no_grad():
        first = int(cm.model(input_ids=ids).logits[0, -1].argmax())
    text = generate(cm, "hello", max_new_tokens=3, greedy=True)
    assert isinstance(text, str)
    assert cm.tokenizer.decode([first], skip_special_tokens=True) in text or first in cm.tokenizer.all_special_ids
