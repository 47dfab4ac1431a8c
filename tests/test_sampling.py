"""Seeded sampling (``training/sampling.py``): an exact sample of softmax(logits / T), and a pure
function of (seed, step, completion index, position), whatever the batch layout."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from qolora.training.sampling import SeededGeneration, SeededSampler, check_sampling_settings, gumbel, key

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -30.0])


def draw(rows: list[int], temperature: float = 0.7, where=(0, 5, False, 0), logits=LOGITS) -> torch.Tensor:
    """One token per row: the index ``generate`` would take from the processor's output."""
    out = SeededSampler(where, rows, temperature)(torch.zeros(len(rows), 1), logits.expand(len(rows), -1).clone())
    assert torch.isin(out, torch.tensor([0.0, float("-inf")])).all() and (out == 0).sum(1).eq(1).all()
    return out.argmax(dim=1)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_the_frequencies_are_softmax_of_logits_over_t(temperature) -> None:
    n = 40000
    got = torch.bincount(draw(list(range(n)), temperature), minlength=len(LOGITS)).float() / n
    want = torch.softmax(LOGITS / temperature, dim=0)
    # binomial sd <= sqrt(0.25 / 40000) = 0.0025; the bound is 4 sd (the draws are fixed, not flaky)
    assert (got - want).abs().max() < 0.01, (got, want)
    assert got[-1] == 0  # a token of ~0 probability is never drawn


def test_a_completion_depends_on_its_global_index_not_on_its_batch() -> None:
    whole = draw(list(range(8)))
    halves = torch.cat([draw([0, 1, 2, 3]), draw([4, 5, 6, 7])])  # 2 ranks of 4 rows
    assert torch.equal(whole, halves)
    assert torch.equal(draw([5, 2]), whole[[5, 2]])
    assert not torch.equal(draw(list(range(8)), where=(0, 6, False, 0)), whole)  # another step, other tokens
    assert not torch.equal(draw(list(range(8)), where=(1, 5, False, 0)), whole)  # another seed


def test_each_new_token_draws_new_noise() -> None:
    flat = torch.zeros(6)  # uniform: the draw is the noise's argmax
    s = SeededSampler((0, 1, False, 0), list(range(64)), 1.0)
    first = s(torch.zeros(64, 1), flat.expand(64, -1).clone()).argmax(1)
    second = s(torch.zeros(64, 2), flat.expand(64, -1).clone()).argmax(1)
    assert not torch.equal(first, second)
    assert len(set(first.tolist())) == 6  # 64 rows spread over the vocabulary


def test_the_noise_is_standard_gumbel_and_device_free() -> None:
    g = gumbel([key(3, 4, 5)], 200000, "cpu")[0].double()
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - torch.pi**2 / 6) < 0.03  # Euler-Mascheroni, pi^2/6
    assert torch.equal(gumbel([7, 8], 10, "cpu"), gumbel([7, 8], 10, torch.device("cpu")))
    assert key(1, 2) != key(2, 1) and key(1, 2**40) != key(1, 0)


def test_a_warper_the_sampler_does_not_apply_is_refused() -> None:
    check_sampling_settings(GenerationConfig(do_sample=True, temperature=0.7, top_p=1.0, top_k=0))
    with pytest.raises(ValueError, match="applies the temperature only; these are set: top_p"):
        check_sampling_settings(GenerationConfig(do_sample=True, top_p=0.9, top_k=0))


class _Accelerator:
    def __init__(self, rank: int, ranks: int) -> None:
        self.process_index, self.num_processes = rank, ranks

    def unwrap_model(self, model):
        return model


class _LM:
    """A model whose ``generate`` takes 3 tokens per row through the given logits processor."""

    def generate(self, rows: int, logits_processor):
        scores = torch.zeros(rows, 16)
        return torch.stack([logits_processor[0](torch.zeros(rows, 1), scores.clone()).argmax(1) for _ in range(3)], 1)


class _TRL:
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        return self.model_wrapped.generate(len(prompt_ids))


class _Trainer(SeededGeneration, _TRL):
    """What SeededGeneration reads of TRL's GRPOTrainer, on a fake model."""

    def __init__(self, rank: int = 0, ranks: int = 1, training: bool = True) -> None:
        self.args, self.state = SimpleNamespace(seed=0), SimpleNamespace(global_step=0)
        self.model = SimpleNamespace(training=training)
        self.model_wrapped, self.accelerator = _LM(), _Accelerator(rank, ranks)
        self.generation_config = GenerationConfig(do_sample=True, top_p=1.0, top_k=0)
        self.temperature, self._metrics = 1.0, {"train": defaultdict(list), "eval": defaultdict(list)}

    def at(self, step: int) -> _Trainer:
        self.state.global_step = step
        return self


def test_the_trainer_indexes_completions_globally_and_pairs_its_evals() -> None:
    one = _Trainer().at(3)._generate_single_turn([0] * 8)
    two = [_Trainer(rank=r, ranks=2).at(3)._generate_single_turn([0] * 4) for r in (0, 1)]
    assert torch.equal(one, torch.cat(two))  # 2 ranks of 4 rows sample 1 rank's 8
    assert not torch.equal(_Trainer().at(4)._generate_single_turn([0] * 8), one)  # each train step: new noise
    ev = _Trainer(training=False)
    first = [ev.at(0)._generate_single_turn([0] * 4) for _ in range(2)]  # an eval's two batches
    assert not torch.equal(first[0], first[1])  # the second batch's rows are rows 4-7, not 0-3 again
    later = [ev.at(7)._generate_single_turn([0] * 4) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, later, strict=True))  # every eval: the same noise
    assert len(ev._metrics["eval"]["generation_s"]) == 4
