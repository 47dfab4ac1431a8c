"""Seeded sampling for online RL: each completion's tokens are a pure function of
(seed, step, completion index, token position) and the model's logits.

TRL's GRPOTrainer samples with ``torch.multinomial`` on the global RNG, seeded per rank
(``set_seed(seed, device_specific=True)``). A completion then depends on the rank it lands on and
on how many rows share its batch: 2 ranks sample other completions than 1 rank at the same global
batch, and a resumed run reproduces the uninterrupted one only through the checkpoint's RNG state.

``SeededSampler`` draws by the Gumbel-max trick instead: token = argmax(logits / T + G), with G
standard Gumbel noise from a counter-based hash of (seed, step, global completion index, token
position, vocabulary index). That is an exact sample of softmax(logits / T) (Gumbel 1954; Maddison
et al. 2014), and the noise is the same on any device, at any world size and batch layout. The
tokens are then the same wherever the logits round to the same argmax.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # the 32-bit integer hash of Mueller (lowbias): x ^= x >> 16; x *= 0x45d9f3b; ...


def _mix(x: Any) -> Any:
    """The hash, on a Python int or elementwise on an int64 tensor of 32-bit values (the products
    stay below 2**63)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * _MIX) & _M32
    return ((x >> 16) ^ x) & _M32


def key(*parts: int) -> int:
    """A 32-bit key of integers, chained through the hash."""
    k = 0x9E3779B9
    for p in parts:
        k = _mix(k ^ (int(p) & _M32) ^ _mix(int(p) >> 32))
    return k


def vocab_hash(vocab: int, device: torch.device | str) -> torch.Tensor:
    """The hash of every vocabulary index, (1, vocab) int64: what ``gumbel`` mixes each key with."""
    return _mix(torch.arange(vocab, dtype=torch.int64, device=device))[None, :]


def gumbel(keys: list[int], vocab: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise, (len(keys), vocab) in fp32, one row per key: -log(-log(u)), with u the
    hash of (key, vocabulary index) as a 24-bit uniform in (0, 1). ``vocab``: its size, or its
    ``vocab_hash``."""
    v = vocab_hash(vocab, device) if isinstance(vocab, int) else vocab
    x = _mix(torch.tensor(keys, dtype=torch.int64, device=device)[:, None] ^ v)
    u = ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


class SeededSampler:
    """A transformers logits processor that samples by Gumbel-max with ``gumbel`` noise.

    ``where``: the generation's key parts (seed, step, ...); ``rows``: the global index of each batch
    row's completion (rank offset + row); each call (one new token) advances the token position. It returns
    0 at the chosen token and -inf elsewhere, so ``generate``'s own softmax-multinomial picks that
    token whatever its RNG (the later temperature warper leaves 0 and -inf as they are).
    """

    def __init__(self, where: tuple[int, ...], rows: list[int], temperature: float) -> None:
        self.row_keys = [key(*where, r) for r in rows]
        self.temperature = temperature
        self.position = 0
        self.vocab: torch.Tensor | None = None  # vocab_hash, once per generation

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.row_keys):
            raise RuntimeError(f"seeded sampling: {scores.shape[0]} rows, expected {len(self.row_keys)}")
        keys = [key(k, self.position) for k in self.row_keys]
        self.position += 1
        if self.vocab is None or self.vocab.shape[-1] != scores.shape[-1]:
            self.vocab = vocab_hash(scores.shape[-1], scores.device)
        noisy = scores.float() / self.temperature + gumbel(keys, self.vocab, scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, noisy.argmax(dim=-1, keepdim=True), 0.0)


def check_sampling_settings(generation_config: Any) -> None:
    """``SeededSampler`` applies the temperature only: refuse any other active warper."""
    gc = generation_config
    active = {
        "top_k": gc.top_k not in (None, 0),
        "top_p": gc.top_p not in (None, 1.0),
        "min_p": gc.min_p is not None,
        "repetition_penalty": gc.repetition_penalty not in (None, 1.0),
        "typical_p": getattr(gc, "typical_p", None) not in (None, 1.0),
    }
    on = [k for k, v in active.items() if v]
    if on:
        raise ValueError(f"seeded sampling applies the temperature only; these are set: {', '.join(on)}")


@contextlib.contextmanager
def seeded_generate(model: Any, sampler: SeededSampler):
    """Within the block, ``model.generate`` samples with ``sampler`` (an instance attribute over the
    bound method, removed on exit)."""
    from transformers import LogitsProcessorList

    plain = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        return plain(*args, logits_processor=LogitsProcessorList([sampler]), **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate


class SeededGeneration:
    """A GRPOTrainer mixin: completions sampled with ``SeededSampler`` (the same completions at any
    world size, and after a resume without the RNG state), and the seconds spent generating logged
    per step as ``generation_s``. ``seeded = False`` (benchmarks/grpo.py's baseline) keeps TRL's
    sampling on the RNG, and the timing."""

    seeded = True

    def _generate_single_turn(self, prompt_ids, *args: Any, **kwargs: Any):
        if getattr(self, "use_vllm", False):  # vLLM samples on its own; not seeded here
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        mode = "train" if self.model.training else "eval"
        sampling = contextlib.nullcontext()
        if self.seeded:
            check_sampling_settings(self.generation_config)
            done = self.__dict__.setdefault("_seeded_rows", {})  # rows sampled so far, over all ranks, per step
            at, local = (mode, self.state.global_step), len(prompt_ids)
            first = done.get(at, 0) + self.accelerator.process_index * local  # the global index of row 0
            done[at] = done.get(at, 0) + self.accelerator.num_processes * local  # an eval's next batch; a tool turn
            # an eval draws the same noise at every step: the held-out rewards of two steps are paired
            where = (self.args.seed, self.state.global_step if mode == "train" else -1, mode == "eval")
            sampler = SeededSampler(where, list(range(first, first + local)), self.temperature)
            sampling = seeded_generate(self.accelerator.unwrap_model(self.model_wrapped), sampler)
        start = time.perf_counter()
        with sampling:
            out = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self._metrics[mode]["generation_s"].append(time.perf_counter() - start)
        return out
