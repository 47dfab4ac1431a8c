"""``qolora export gguf``: llama.cpp's own converter, read back with its own gguf-py.

The converter comes from the pinned llama-cpp-python sdist on PyPI (76 MB, then cached; see
qolora/export/gguf.py). scripts/setup.sh fetches it; the tests only use the cached one and make no
download. Running the GGUF in llama.cpp itself is the slow test at the end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

import qolora
from qolora import quant
from qolora.cli import main
from qolora.export import export_merged
from qolora.export.gguf import export_gguf, gguf_module, llama_cpp_dir
from qolora.export.merged import PORTABLE_TOKENIZER_CLASS

from .conftest import perturb_lora_


@pytest.fixture(scope="module")
def converter():
    try:
        return llama_cpp_dir(fetch=False)
    except FileNotFoundError as e:
        pytest.skip(f"{e}: scripts/setup.sh fetches it (or set QOLORA_LLAMA_CPP); the suite downloads nothing")


@pytest.fixture(scope="module")
def adapter(bpe_model_dir, tmp_path_factory):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="olora")
    model = qolora.get_qolora_model(quant.load_quantized(bpe_model_dir), cfg, progress=False)
    return qolora.save_adapter(perturb_lora_(model, 0.05), tmp_path_factory.mktemp("gguf") / "adapter")


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "m"
    export_merged(adapter, out, progress=False)
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    return out, sd


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders Llama's q and k rows per head (LlamaModel.permute): undo nothing, redo it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(gguf, path, n_layers):
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, data.reshape(tuple(reversed([int(x) for x in t.shape]))))
    return out


def _expected(sd, cfg, gguf):
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for key, w in sd.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        a = w.float().numpy()
        if key.endswith("q_proj.weight"):
            a = _permute(a, cfg["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            a = _permute(a, cfg["num_key_value_heads"])
        yield key, name, a


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_tensors_equal_the_merged_export(adapter, merged, converter, tmp_path, kind) -> None:
    folder, sd = merged
    res = export_gguf(adapter, tmp_path / "m.gguf", type=kind, llama_cpp=converter, progress=False)
    gguf = gguf_module(converter)
    cfg = json.loads((folder / "config.json").read_text())
    got = _gguf_tensors(gguf, res.path, cfg["num_hidden_layers"])
    seen = set()
    for key, name, want in _expected(sd, cfg, gguf):
        assert name in got, key
        seen.add(name)
        qtype, g = got[name]
        assert g.shape == want.shape, key
        if kind == "f16" or want.ndim == 1 or qtype in ("F16", "F32"):
            assert np.array_equal(g.astype(np.float32), want), key  # exact: same fp16 values
        else:
            assert qtype == "Q8_0", key
            blocks = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # Q8_0: scale d per 32 values
            err = np.abs(g.astype(np.float32) - want).reshape(-1, 32)
            # half a step, plus |q| <= 127 times d's fp16 rounding (2^-11 relative): 0.5 + 0.062
            assert (err <= 0.57 * blocks).all(), key
            assert (err > 0).any(), key  # it was quantized
    assert seen == set(got)  # nothing left out, nothing extra
    assert res.tensors == len(sd)


def test_gguf_metadata_modelfile_and_portable_tokenizer(adapter, merged, converter, tmp_path, bpe_model_dir) -> None:
    from transformers import AutoTokenizer

    res = export_gguf(adapter, tmp_path / "chat.gguf", llama_cpp=converter, name="tiny QOLoRA", progress=False)
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    meta = res.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny QOLoRA"
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id == 1
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == 2
    assert meta["tokenizer.ggml.tokens.count"] == len(tok)
    assert "general.base_model.0.repo_url" not in meta  # a local base is not passed off as a hub id
    mf = res.modelfile.read_text()
    assert mf.startswith("FROM ./chat.gguf\n") and "<|im_start|>assistant" in mf
    assert 'PARAMETER stop "</s>"' in mf and 'PARAMETER stop "<|im_end|>"' in mf
    # the merged folder's tokenizer: a class transformers 4.x resolves, and the same tokens in 5.x
    folder, _ = merged
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert json.loads((bpe_model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert cfg["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
    assert _transformers_4_resolves(cfg["tokenizer_class"])
    text = "the quick fox <|im_start|> ümlaut"
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == tok(text).input_ids


def _transformers_4_resolves(name: str) -> bool:
    """transformers 4.57's tokenizer_class_from_name, for classes in tokenizer_config.json: PreTrainedTokenizerFast
    is special-cased; any other name must be a class of the transformers 4.x package, which TokenizersBackend
    (new in 5.0) is not."""
    import transformers

    return name == "PreTrainedTokenizerFast" or (name != "TokenizersBackend" and hasattr(transformers, name))


def test_gguf_refusals_are_one_line(adapter, converter, tmp_path, capsys, monkeypatch) -> None:
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(adapter, tmp_path / "x.bin", llama_cpp=converter)
    with pytest.raises(ValueError, match="type: expected one of"):
        export_gguf(adapter, tmp_path / "x.gguf", type="q5", llama_cpp=converter)
    with pytest.raises(FileNotFoundError, match="no convert_hf_to_gguf.py"):
        export_gguf(adapter, tmp_path / "x.gguf", llama_cpp=tmp_path)
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    rc = main(["export", "gguf", str(adapter), str(tmp_path / "q.gguf"), "--type", "q4_k_m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install llama-cpp-python==" in err[0], err
    assert not list(tmp_path.glob("*q.gguf*"))


def test_cli_export_gguf(adapter, converter, tmp_path, capsys) -> None:
    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", str(adapter), str(out), "--llama-cpp", str(converter), "--type", "bf16"]) == 0
    assert out.is_file() and (tmp_path / "cli.Modelfile").is_file()
    assert "ollama create" in capsys.readouterr().out
    assert main(["export", "gguf", str(adapter), str(out), "--llama-cpp", str(converter)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


@pytest.mark.slow
def test_llama_cpp_runs_the_gguf_with_the_merged_models_predictions(adapter, merged, converter, tmp_path) -> None:
    """llama.cpp itself (llama-cpp-python, built from source) loads the f16 GGUF and predicts as the merged model."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install llama-cpp-python==0.3.36")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = merged
    res = export_gguf(adapter, tmp_path / "m.gguf", llama_cpp=converter, progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(str(res.path), n_ctx=256, logits_all=True, verbose=False)
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "the quick brown fox"},
            {"role": "assistant", "content": "jumps over the lazy dog"},
        ],
        tokenize=False,
    )
    ids = tok(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0]
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert (got - want).abs().max() < 0.05
