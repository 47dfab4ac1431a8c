"""The row formats, one small object each: its fields, its checks, how it is detected, how it becomes
chat turns and plain-template segments, and how a prompt typed at ``qolora generate`` becomes a row.

Adding a format means adding one class here and listing it in ``FORMATS``; the config's choices,
detection, validation, tokenizing and generate all read it from there.
"""

from __future__ import annotations

from typing import Any, ClassVar

Segments = list[tuple[str, bool]]  # (text, trained on)
Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant", "tool")


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise KeyError(key)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _nonempty(r: dict[str, str], *keys: str) -> dict[str, str]:
    for k in keys:
        if not r[k].strip():
            raise ValueError(f"field '{k}' is empty")
    return r


def alpaca_prompt(instruction: str, inp: str) -> str:
    """The Alpaca prompt (Taori et al., 2023) without its preamble."""
    text = f"### Instruction:\n{instruction}\n\n"
    if inp.strip():
        text += f"### Input:\n{inp}\n\n"
    return text + "### Response:\n"


def plain_chat_segments(messages: Messages) -> Segments:
    """Turns as ``role: text`` lines; an assistant turn's text (not its ``assistant: `` label) is trained."""
    segs: Segments = []
    for m in messages:
        if m["role"] == "assistant":
            segs += [("assistant: ", False), (f"{m['content']}\n", True)]
        else:
            segs.append((f"{m['role']}: {m['content']}\n", False))
    return segs


class Format:
    """One row format. ``check`` validates and normalizes a row (raising KeyError / TypeError /
    ValueError naming the field); ``empty`` is the normalized stand-in for a bad row."""

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]  # all present: the format is detected
    empty: ClassVar[dict[str, Any]]
    describe: ClassVar[str]

    def check(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def to_messages(self, row: dict[str, Any]) -> Messages | None:
        """The row as chat turns (None: the format has no turns)."""
        raise NotImplementedError

    def plain_segments(self, row: dict[str, Any]) -> Segments:
        """The row under the plain template (no chat template)."""
        return plain_chat_segments(self.to_messages(row) or [])

    def prompt_row(self, messages: Messages) -> dict[str, Any]:
        """A row holding the conversation so far and an empty reply: what ``generate`` renders."""
        raise NotImplementedError


class Chat(Format):
    name, fields, describe = "chat", ("messages",), "messages"
    empty: ClassVar[dict[str, Any]] = {"messages": [{"role": "user", "content": ""}]}
    key, role_key, content_key = "messages", "role", "content"
    roles: ClassVar[dict[str, str]] = {r: r for r in ROLES}

    def check(self, row: dict[str, Any], need_reply: bool = True) -> dict[str, Any]:
        k = self.key
        turns = row.get(k)
        if turns is None:
            raise KeyError(k)
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"field '{k}' must be a non-empty list")
        out = []
        for j, m in enumerate(turns):
            if not isinstance(m, dict):
                raise TypeError(f"field '{k}[{j}]' must be an object")
            role, content = m.get(self.role_key), m.get(self.content_key)
            if role not in self.roles:
                raise ValueError(f"field '{k}[{j}].{self.role_key}' must be one of {list(self.roles)}, got {role!r}")
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"field '{k}[{j}].{self.content_key}' must be a non-empty string")
            out.append({self.role_key: role, self.content_key: content})
        if need_reply and not any(self.roles[m[self.role_key]] == "assistant" for m in out):
            raise ValueError(f"field '{k}' has no assistant turn to learn from")
        return {k: out}

    def to_messages(self, row: dict[str, Any]) -> Messages:
        return [{"role": self.roles[m[self.role_key]], "content": m[self.content_key]} for m in row[self.key]]

    def prompt_row(self, messages: Messages) -> dict[str, Any]:
        back = {v: k for k, v in self.roles.items()}
        turns = [*messages, {"role": "assistant", "content": ""}]
        return {self.key: [{self.role_key: back[m["role"]], self.content_key: m["content"]} for m in turns]}


class ShareGPT(Chat):
    """ShareGPT's ``conversations`` of ``{from, value}`` (axolotl's and LLaMA-Factory's sharegpt)."""

    name, fields, describe = "sharegpt", ("conversations",), "conversations"
    empty: ClassVar[dict[str, Any]] = {"conversations": [{"from": "human", "value": ""}]}
    key, role_key, content_key = "conversations", "from", "value"
    roles: ClassVar[dict[str, str]] = {"system": "system", "human": "user", "gpt": "assistant"}


class Alpaca(Format):
    name, fields, describe = "alpaca", ("instruction", "output"), "instruction+output"
    empty: ClassVar[dict[str, Any]] = {"instruction": "", "input": "", "output": ""}

    def check(self, row: dict[str, Any]) -> dict[str, Any]:
        r = {
            "instruction": _text(row, "instruction"),
            "input": _text(row, "input", False),
            "output": _text(row, "output"),
        }
        return _nonempty(r, "instruction", "output")

    def to_messages(self, row: dict[str, Any]) -> Messages:
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]

    def plain_segments(self, row: dict[str, Any]) -> Segments:
        return [(alpaca_prompt(row["instruction"], row["input"]), False), (row["output"], True)]

    def prompt_row(self, messages: Messages) -> dict[str, Any]:
        return {"instruction": _last_user(messages), "input": "", "output": ""}


class PromptCompletion(Format):
    name, fields, describe = "prompt_completion", ("prompt", "completion"), "prompt+completion"
    empty: ClassVar[dict[str, Any]] = {"prompt": "", "completion": ""}

    def check(self, row: dict[str, Any]) -> dict[str, Any]:
        return _nonempty(
            {"prompt": _text(row, "prompt"), "completion": _text(row, "completion")}, "prompt", "completion"
        )

    def to_messages(self, row: dict[str, Any]) -> Messages:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]

    def plain_segments(self, row: dict[str, Any]) -> Segments:
        return [(row["prompt"], False), (row["completion"], True)]

    def prompt_row(self, messages: Messages) -> dict[str, Any]:
        return {"prompt": _last_user(messages), "completion": ""}


class Text(Format):
    name, fields, describe = "text", ("text",), "text"
    empty: ClassVar[dict[str, Any]] = {"text": ""}

    def check(self, row: dict[str, Any]) -> dict[str, Any]:
        return _nonempty({"text": _text(row, "text")}, "text")

    def to_messages(self, row: dict[str, Any]) -> None:
        return None

    def plain_segments(self, row: dict[str, Any]) -> Segments:
        return [(row["text"], True)]

    def prompt_row(self, messages: Messages) -> dict[str, Any]:
        return {"text": _last_user(messages)}  # a continuation of the text


def _turns(value: Any, key: str) -> Messages:
    """``value`` as chat turns: a string is one user turn; a list must hold {role, content} turns."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise TypeError(f"field '{key}' must be a string or a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise TypeError(f"field '{key}[{j}]' must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"field '{key}[{j}].role' must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"field '{key}[{j}].content' must be a string")
        out.append({"role": role, "content": content})
    return out


def _reply(value: Any, key: str) -> tuple[Messages, str]:
    """A reply field: a string, or a message list ending in an assistant turn (turns before it are
    the conversation it answers). Returns (those earlier turns, the reply's text)."""
    if isinstance(value, str):
        return [], value
    turns = _turns(value, key)
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"field '{key}' must end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


class Pairs(Format):
    """A preference pair, normalized to ``{prompt: turns, chosen: text, rejected: text}``; rendered
    (for SFT, generate and the plain template) as the prompt answered by the chosen reply."""

    empty: ClassVar[dict[str, Any]] = {"prompt": [{"role": "user", "content": ""}], "chosen": "", "rejected": ""}

    def pair(self, prompt: Messages, chosen: str, rejected: str) -> dict[str, Any]:
        if not any(m["content"].strip() for m in prompt):
            raise ValueError("field 'prompt' is empty")
        for k, v in (("chosen", chosen), ("rejected", rejected)):
            if not v.strip():
                raise ValueError(f"field '{k}' is empty")
        if chosen == rejected:
            raise ValueError("field 'rejected' equals 'chosen': the pair prefers nothing")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def to_messages(self, row: dict[str, Any]) -> Messages:
        return [*row["prompt"], {"role": "assistant", "content": row["chosen"]}]

    def prompt_row(self, messages: Messages) -> dict[str, Any]:
        return {"prompt": messages, "chosen": "", "rejected": ""}


class Preference(Pairs):
    """TRL's preference rows: ``prompt`` (a string or turns; absent when ``chosen`` and ``rejected``
    are whole conversations sharing it) with ``chosen`` and ``rejected`` (strings or turns)."""

    name, fields, describe = "preference", ("chosen", "rejected"), "prompt+chosen+rejected"

    def check(self, row: dict[str, Any]) -> dict[str, Any]:
        before_c, chosen = _reply(row.get("chosen"), "chosen")
        before_r, rejected = _reply(row.get("rejected"), "rejected")
        if row.get("prompt") is not None:
            prompt = _turns(row["prompt"], "prompt") + before_c
            if before_c != before_r:
                raise ValueError("fields 'chosen' and 'rejected' continue the prompt with different turns")
        else:
            if before_c != before_r or not before_c:
                raise KeyError("prompt")  # no prompt field, and no shared conversation before the replies
            prompt = before_c
        return self.pair(prompt, chosen, rejected)


class ShareGPTPreference(Pairs):
    """LLaMA-Factory's and axolotl's ShareGPT pairs: ``conversations`` (the prompt) with ``chosen``
    and ``rejected`` replies, each ``{from: gpt, value}``."""

    name, fields = "sharegpt_preference", ("conversations", "chosen", "rejected")
    describe = "conversations+chosen+rejected"

    def check(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = [
            {"role": ShareGPT.roles[m["from"]], "content": m["value"]}
            for m in ShareGPT().check(row, need_reply=False)["conversations"]
        ]
        replies = []
        for k in ("chosen", "rejected"):
            v = row.get(k)
            if v is None:
                raise KeyError(k)
            if isinstance(v, dict):
                if v.get("from") != "gpt" or not isinstance(v.get("value"), str):
                    raise ValueError(f"field '{k}' must be {{from: gpt, value: <text>}}")
                v = v["value"]
            if not isinstance(v, str):
                raise TypeError(f"field '{k}' must be a string or {{from: gpt, value: <text>}}")
            replies.append(v)
        return self.pair(prompt, *replies)


class KTO(Format):
    """KTO's unpaired rows: ``prompt`` (a string or turns), ``completion`` (a string or turns ending
    with the assistant's) and ``label`` (true: desirable)."""

    name, fields, describe = "kto", ("prompt", "completion", "label"), "prompt+completion+label"
    empty: ClassVar[dict[str, Any]] = {"prompt": [{"role": "user", "content": ""}], "completion": "", "label": True}

    def check(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("prompt") is None:
            raise KeyError("prompt")
        before, completion = _reply(row.get("completion"), "completion")
        prompt = _turns(row["prompt"], "prompt") + before
        if not completion.strip():
            raise ValueError("field 'completion' is empty")
        if not isinstance(row.get("label"), bool):
            raise TypeError(f"field 'label' must be true or false, got {row.get('label')!r}")
        return {"prompt": prompt, "completion": completion, "label": row["label"]}

    def to_messages(self, row: dict[str, Any]) -> Messages:
        return [*row["prompt"], {"role": "assistant", "content": row["completion"]}]

    def prompt_row(self, messages: Messages) -> dict[str, Any]:
        return {"prompt": messages, "completion": "", "label": True}


def _last_user(messages: Messages) -> str:
    """A one-turn format holds the last user turn (earlier turns and a system message have no place in it)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (Chat(), ShareGPTPreference(), ShareGPT(), Preference(), KTO(), Alpaca(), PromptCompletion(), Text())
}
PAIRED = ("preference", "sharegpt_preference")  # rows a pairwise method (dpo, ipo, orpo, simpo) trains on
FORMAT_NAMES = tuple(FORMATS)  # detection order: the first whose fields are all present; = choices.DATA_FORMATS


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"data.format: unknown format {name!r}; use auto, {', '.join(FORMATS)}") from None
