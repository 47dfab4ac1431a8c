"""``qolora export gguf``: the merged export, converted by llama.cpp's own converter.

No hand-written GGUF code: the streamed merged export (``export_merged``) goes into a temporary
folder, llama.cpp's ``convert_hf_to_gguf.py`` turns it into f16, bf16 or q8_0, and llama.cpp's
quantizer (llama-cpp-python's binding, when installed) makes q4_k_m from the f16 file. The
result is checked (tokenizer, chat template, bos/eos ids) and renamed into place, with an Ollama
``Modelfile`` beside it.

The converter comes from the llama-cpp-python source distribution on PyPI, pinned to
``LLAMA_CPP_PYTHON_VERSION``: the first export downloads it with pip (76 MB) and keeps only the
converter (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``, 3 MB) in the cache
(``$QOLORA_CACHE`` or ``~/.cache/qolora``). Offline, pass ``llama_cpp=`` (``--llama-cpp DIR``),
a llama.cpp checkout, or set ``$QOLORA_LLAMA_CPP``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import ExternalToolError, atomic_dir, write_text_atomic
from ..choices import GGUF_TYPES
from .merged import export_merged

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_INSTALL_QUANTIZER = (
    f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (it builds llama.cpp from source: about 12 minutes "
    "on 2 cores)"
)


def cache_dir() -> Path:
    root = os.environ.get("QOLORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qolora"
    return Path(root)


def llama_cpp_dir(explicit: str | os.PathLike[str] | None = None, fetch: bool = True) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py``: given, from $QOLORA_LLAMA_CPP, cached, or fetched.

    Raises:
        FileNotFoundError: a given folder has no converter, or none is cached and ``fetch`` is False.
        ExternalToolError: pip could not download the pinned source distribution.
    """
    given = explicit or os.environ.get("QOLORA_LLAMA_CPP")
    if given:
        d = Path(given)
        if not (d / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"{d}: no convert_hf_to_gguf.py there; pass a llama.cpp checkout")
        return d
    d = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if (d / "convert_hf_to_gguf.py").is_file():
        return d
    if not fetch:
        raise FileNotFoundError(f"llama.cpp's converter is not cached in {d}")
    _fetch_converter(d)
    return d


def _fetch_converter(dest: Path) -> None:
    """Download the pinned llama-cpp-python sdist with pip and keep only the converter, atomically."""
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    logger.info("fetching llama.cpp's converter: pip download %s (once; cached in %s)", spec, dest)
    with tempfile.TemporaryDirectory() as dl:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", dl, spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(dl).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            last = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise ExternalToolError(
                f"could not download {spec} for llama.cpp's converter ({last}); pass --llama-cpp DIR with a "
                "llama.cpp checkout instead"
            )
        with tarfile.open(sdists[0]) as tar, atomic_dir(dest) as tmp:
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix) :] if m.name.startswith(prefix) else None
                if rel and (rel in _KEEP or rel.startswith(tuple(k for k in _KEEP if k.endswith("/")))):
                    m.name = rel
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise ExternalToolError(f"{sdists[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
            tar.extractall(tmp, members=members, filter="data")


def gguf_module(converter: Path) -> Any:
    """The ``gguf`` package that ships with the converter (its reader matches its writer)."""
    path = str(converter / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


@dataclass
class GGUFResult:
    path: Path
    type: str
    bytes_written: int
    tensors: int
    modelfile: Path
    seconds: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return (
            f"wrote {self.path}: {self.type}, {self.tensors} tensors, {self.bytes_written / 2**20:.1f} MiB ({times})\n"
            f"Ollama: ollama create {self.metadata.get('general.name', 'model')!r} -f {self.modelfile}"
        )


def converter_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` as llama.cpp's converter reads it: transformers 5 writes some families' settings
    under new names (or fills defaults in) that the pinned converter does not read.

    - GPT-2: ``n_ctx`` (the converter's context length) is ``n_positions``; transformers 5 drops it.
    - GPT-NeoX: ``rotary_pct`` is ``rope_parameters.partial_rotary_factor`` in transformers 5.
    - Falcon (multi-query, old decoder): transformers 5 writes ``num_kv_heads`` = the head count, which
      the model ignores (it uses one KV head) and the converter reads: it is 1.

    Returns a new dict; the merged export's own config.json (read by transformers) is not changed.
    """
    out = dict(cfg)
    kind = cfg.get("model_type")
    if kind == "gpt2" and "n_ctx" not in cfg and "n_positions" in cfg:
        out["n_ctx"] = cfg["n_positions"]
    if kind == "gpt_neox" and "rotary_pct" not in cfg:
        rope = cfg.get("rope_parameters") or {}
        out["rotary_pct"] = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if "rope_theta" in rope and "rotary_emb_base" not in cfg:
            out["rotary_emb_base"] = rope["rope_theta"]
    if kind == "falcon" and cfg.get("multi_query") and not cfg.get("new_decoder_architecture"):
        out["num_kv_heads"] = 1
    return out


# The converter reads config.json through transformers' AutoConfig, whose transformers 5 classes drop
# the legacy keys it then asks for (GPT-NeoX's rotary_pct): it runs with config.json's own keys kept
# beside AutoConfig's. Used where the converter has conversion/base.py (the pinned one does).
_KEEP_CONFIG_KEYS = """import json, runpy, sys
from pathlib import Path
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).parent))
from conversion import base
load = base.ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format):
    cfg = load(dir_model, is_mistral_format)
    raw = Path(dir_model) / "config.json"
    if not is_mistral_format and raw.is_file():
        for k, v in json.loads(raw.read_text()).items():
            cfg.setdefault(k, v)
    return cfg
base.ModelBase.load_hparams = staticmethod(load_hparams)
runpy.run_path(script, run_name="__main__")
"""


def _convert(converter: Path, merged: Path, out: Path, outtype: str, name: str) -> None:
    import json

    cfg_path = merged / "config.json"  # the temporary merged export's: rewritten for the converter
    cfg_path.write_text(json.dumps(converter_config(json.loads(cfg_path.read_text())), indent=2))
    keep = ["-c", _KEEP_CONFIG_KEYS] if (converter / "conversion" / "base.py").is_file() else []
    cmd = [
        sys.executable,
        *keep,
        str(converter / "convert_hf_to_gguf.py"),
        str(merged),
        "--outfile",
        str(out),
        "--outtype",
        outtype,
        "--model-name",
        name,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out.is_file():
        errors = [ln for ln in done.stderr.splitlines() if "Error" in ln or "error" in ln] or done.stderr.splitlines()
        raise ExternalToolError(f"llama.cpp's converter failed on {merged}: {(errors or ['no output'])[-1].strip()}")


def _quantizer() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ExternalToolError(
            f"--type q4_k_m needs llama.cpp's quantizer: {_INSTALL_QUANTIZER}; or export --type q8_0"
        ) from None
    return llama_cpp


def _quantize(llama_cpp: Any, src: Path, dst: Path) -> None:
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExternalToolError(f"llama.cpp's quantizer failed on {src} (code {rc})")


def read_metadata(gguf: Any, path: Path) -> tuple[dict[str, Any], int]:
    """The GGUF's scalar and string fields (token lists left out) and its tensor count."""
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in ("tokens", "merges", "token_type", "scores"):
            meta[key + ".count"] = len(f.data)
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - a field type this gguf-py cannot render is left out
            continue
    return meta, len(reader.tensors)


def check_metadata(meta: dict[str, Any], tok: Any) -> None:
    """The GGUF's chat template and special tokens must be the merged model's tokenizer's.

    Raises:
        ValueError: naming the first field that differs.
    """
    want = {
        "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.chat_template": getattr(tok, "chat_template", None),
    }
    for key, value in want.items():
        if value is not None and meta.get(key) != value:
            raise ValueError(f"GGUF metadata {key} is {meta.get(key)!r}, the tokenizer has {value!r}")
    n = meta.get("tokenizer.ggml.tokens.count")
    if n is not None and n < len(tok):
        raise ValueError(f"GGUF has {n} tokens, the tokenizer {len(tok)}")


# ChatML, as Ollama's own templates spell it (Go text/template). Other chat templates are left to
# Ollama, which reads tokenizer.chat_template from the GGUF and matches it to its known ones.
_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile(gguf_name: str, meta: dict[str, Any], tok: Any) -> str:
    """An Ollama Modelfile: FROM the GGUF, its chat template for ChatML, and the stop tokens."""
    template = meta.get("tokenizer.chat_template") or ""
    stops = [tok.eos_token] if tok.eos_token else []
    lines = [f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{_CHATML}"""')
        stops += [s for s in ("<|im_end|>",) if s not in stops]
    else:
        lines.append("# TEMPLATE: taken by Ollama from the GGUF's tokenizer.chat_template")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def export_gguf(
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type: str = "f16",  # noqa: A002 - the CLI's --type
    mode: str = "trained",
    llama_cpp: str | os.PathLike[str] | None = None,
    name: str | None = None,
    overwrite: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> GGUFResult:
    """Write ``out`` (.gguf) from an adapter dir: merged export → llama.cpp's converter → checks → rename.

    Args:
        type: f16, bf16, q8_0 (the converter) or q4_k_m (f16, then llama.cpp's quantizer).
        mode: the merged export's mode: "trained" or "original".
        llama_cpp: a llama.cpp folder with ``convert_hf_to_gguf.py``; default: cached/fetched (see module doc).
        name: ``general.name``; default: "<base> QOLoRA".

    Raises:
        FileExistsError, FileNotFoundError, ValueError, ExternalToolError: one line naming the input at fault.
    """
    if type not in GGUF_TYPES:
        raise ValueError(f"type: expected one of {GGUF_TYPES}, got {type!r}")
    if importlib.util.find_spec("sentencepiece") is None:
        raise ExternalToolError("export gguf: llama.cpp's converter needs sentencepiece: pip install 'qolora[gguf]'")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output file must end in .gguf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    quantizer = _quantizer() if type == "q4_k_m" else None  # fail before minutes of export
    converter = llama_cpp_dir(llama_cpp)
    gguf = gguf_module(converter)
    seconds: dict[str, float] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        dtype = "bfloat16" if type == "bf16" else "float16"
        merged = export_merged(
            adapter_dir, tmp / "merged", mode=mode, dtype=dtype, checkpoint=checkpoint, progress=progress
        ).out_dir
        seconds["export"] = time.perf_counter() - t0
        if name is None:
            card = (merged / "README.md").read_text()
            base = next((ln.split(":", 1)[1].strip() for ln in card.splitlines() if ln.startswith("base_model:")), "")
            name = f"{Path(base).name or 'model'} QOLoRA"
        t0 = time.perf_counter()
        raw = tmp / "model.gguf"
        _convert(converter, merged, raw, "f16" if type == "q4_k_m" else type, name)
        seconds["convert"] = time.perf_counter() - t0
        if quantizer is not None:
            t0 = time.perf_counter()
            _quantize(quantizer, raw, tmp / "q.gguf")
            raw = tmp / "q.gguf"
            seconds["quantize"] = time.perf_counter() - t0
        meta, n_tensors = read_metadata(gguf, raw)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(merged)
        check_metadata(meta, tok)
        mf = out.with_name(out.stem + ".Modelfile")
        write_text_atomic(mf, modelfile(out.name, meta, tok))
        os.replace(raw, out)
    result = GGUFResult(out, type, out.stat().st_size, n_tensors, mf, seconds, meta)
    logger.info("%s", result)
    return result
