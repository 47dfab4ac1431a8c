"""``qolora generate`` and ``qolora chat``: talk to a fine-tune, streamed token by token.

Either the exact QOLoRA model (an adapter dir: its 4-bit residual base rebuilt from the recorded
checkpoint, as ``load_adapter`` does) or a merged folder (``qolora export merged``). Prompts are
rendered by training's own renderer (``Encoder.prompt_ids``) from the data format and template
recorded in ``qolora.json``: the tokens the model saw before its first trained token.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .files import META_FILE

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    template: str  # "chat" or "plain"
    source: str  # what was loaded, for the banner
    format: str | None = None  # the data format it was trained on (None: not recorded)


def load_chat_model(path: str | os.PathLike[str], template: str = "auto", progress: bool = False) -> ChatModel:
    """An adapter dir (exact QOLoRA model) or a merged HF folder, in eval mode, with its tokenizer.

    Raises:
        FileNotFoundError: ``path`` is neither (named).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import load_adapter
    from .precision import resolve_compute_dtype

    p = Path(path)
    if (p / META_FILE).is_file():
        model = load_adapter(p, progress=progress)
        meta = next(iter(model.qolora_states.values())).meta
        tok_dir = meta.checkpoint or meta.base_model
        recorded = (meta.data or {}).get("template", "auto")
        fmt = (meta.data or {}).get("format")
        if fmt is None:
            logger.warning(
                "%s records no data format (written before QOLoRA recorded it): prompts are rendered as "
                "prompt/completion rows (chat turns for a conversation)",
                p / META_FILE,
            )
        source = f"QOLoRA adapter {p} on its 4-bit base" if meta.quant else f"QOLoRA adapter {p}"
    elif (p / "config.json").is_file():
        tok_dir, recorded, fmt = p, "auto", None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_compute_dtype("auto", device).dtype
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device)
        source = f"merged model {p}"
    else:
        raise FileNotFoundError(f"{p}: neither an adapter dir ({META_FILE}) nor a model folder (config.json)")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model.eval()
    want = template if template != "auto" else recorded
    if want == "auto":
        want = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if want == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{tok_dir}: the tokenizer has no chat template; use --template plain")
    return ChatModel(model, tokenizer, want, source, fmt)


def prompt_ids(cm: ChatModel, prompt: Messages | str) -> list[int]:
    """The prompt for the next assistant turn, rendered as training rendered it (``Encoder.prompt_ids``).

    ``prompt`` is a conversation, or one text (a user turn). Without a recorded format a text is
    rendered as a prompt/completion row and a conversation as a chat row.
    """
    from .training.tokenize import Encoder

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    fmt = cm.format or ("prompt_completion" if isinstance(prompt, str) else "chat")
    return Encoder(cm.tokenizer, max_length=2**31, template=cm.template).prompt_ids(messages, fmt)


class _Streamer:
    """Write each new token's text to ``out`` as soon as it is final (transformers' streamer protocol).

    Text is held back while it could still change: after byte-fallback tokens (``<0xNN>``: a run of
    them decodes as one UTF-8 sequence or as replacement characters) and after half a character.
    What is written is then always a prefix of the decoded reply, which ``end`` completes.
    """

    def __init__(self, tokenizer: Any, out: IO[str]) -> None:
        self.tok, self.out = tokenizer, out
        self.prompt_seen = False
        self.ids: list[int] = []
        self.shown = ""

    def _write(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the prompt arrives first, in one piece
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        tokens = self.tok.convert_ids_to_tokens(self.ids)
        k = len(tokens)
        while k and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tokens[k - 1] or ""):
            k -= 1
        text = self.tok.decode(self.ids[:k], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._write(text)

    def end(self) -> None:
        self._write(self.tok.decode(self.ids, skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()


def generate(
    cm: ChatModel,
    prompt: Messages | str,
    *,
    max_new_tokens: int = 128,
    greedy: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    stream: IO[str] | None = None,
) -> str:
    """The reply to ``prompt`` (see ``prompt_ids``); streamed to ``stream`` when given."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    tok, model = cm.tokenizer, cm.model
    ids = torch.tensor([prompt_ids(cm, prompt)], device=next(model.parameters()).device)
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    kw: dict[str, Any] = (
        {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop) or None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            streamer=_Streamer(tok, stream) if stream is not None else None,
            **kw,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def chat_loop(
    cm: ChatModel, inp: IO[str] | None = None, out: IO[str] | None = None, system: str | None = None, **gen_kw: Any
) -> int:
    """Read user turns line by line until EOF or /exit; /reset clears the history. Returns the turns answered.

    ``inp`` and ``out`` default to stdin and stdout; the banner and prompts appear only on a terminal.
    """
    inp, out = inp or sys.stdin, out or sys.stdout
    interactive = inp.isatty()
    if interactive:
        out.write(f"{cm.source}; /reset clears the history, /exit or Ctrl-D ends\n")
    history: Messages = [{"role": "system", "content": system}] if system else []
    start = list(history)
    turns = 0
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": text})
        out.write("assistant> " if interactive else "")
        reply = generate(cm, history, stream=out, **gen_kw)
        history.append({"role": "assistant", "content": reply})
        turns += 1
    return turns
