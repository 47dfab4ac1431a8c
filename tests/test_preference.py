"""Preference tuning (``train.method``: dpo, ipo, orpo, kto, simpo) on TRL's trainers: the reference
is the initial model exactly, for every init (docs/design.md, invariant 28), on the run harness."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import TrainerCallback

from qolora.adapters import get_qolora_model, load_adapter
from qolora.training import run_dir
from qolora.training.data import DataError, load_rows
from qolora.training.guard import DivergedError, DivergenceGuard
from qolora.training.preference import (
    REFERENCE_ADAPTER,
    build_preference_trainer,
    trl_dataset,
)
from qolora.training.run import load_base, lora_config, train
from qolora.training.tokenize import Encoder
from qolora.training.trainer import prepare_for_training_

from .conftest import KILLER as TRAIN_KILLER
from .conftest import add_trainer_callback, killed_after_checkpoint_4, make_tokenizer, tiny_train_config

WORDS = ["hello", "hi", "good", "fine", "thanks", "yes", "no", "python", "code", "model"]


def pairs_file(tmp_path, n: int = 24, kto: bool = False) -> str:
    rows = []
    for i in range(n):
        prompt = f"what is {WORDS[i % 10]}"
        chosen = f"{WORDS[(i * 3) % 10]} {WORDS[(i * 7) % 10]}"
        rejected = f"{WORDS[(i * 7) % 10]} no {WORDS[i % 10]}"
        if kto:
            rows.append({"prompt": prompt, "completion": chosen if i % 2 else rejected, "label": bool(i % 2)})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    p = tmp_path / ("kto.jsonl" if kto else "pairs.jsonl")
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def pref_config(model_dir, tmp_path, method: str = "dpo", init: str = "olora", **train_kw):
    """The tiny SFT test run's config (``tiny_train_config``) on preference pairs (or KTO rows)."""
    cfg = tiny_train_config(model_dir, tmp_path, method=method, **train_kw)
    cfg.data.train = pairs_file(tmp_path, kto=method == "kto")
    cfg.adapter.init = init.split("-")[0]
    cfg.adapter.init_iters = 2 if init == "olora-iters2" else 1
    return cfg


def step0_trainer(model_dir, tmp_path, init: str, template: str = "auto"):
    """A DPO trainer on a fresh init of the tiny chat model, nothing trained, in fp32 on the CPU."""
    cfg = pref_config(model_dir, tmp_path, init=init)
    cfg.data.template = template
    base = load_base(cfg)
    prepare_for_training_(base, True)
    a = cfg.adapter
    model = get_qolora_model(base, lora_config(cfg), init=a.init, init_iters=a.init_iters)
    tok = make_tokenizer()
    rows = load_rows(cfg.data.train)
    chat = Encoder(tok, 32, template).template == "chat"
    ds = trl_dataset(rows, "dpo", chat)
    return model, build_preference_trainer(model, tok, ds, ds, cfg), rows


def base_digests(model) -> dict[str, str]:
    """sha256 of every 4-bit layer's packed data and whole quant_state."""
    from qolora import quant
    from qolora.distributed import layer_digests

    return layer_digests(model, modules=[(n, m) for n, m in model.named_modules() if quant.is_4bit(m)])


PROBE = torch.tensor([[1, 7, 8, 9, 10, 11]])
INITS = ["lora", "olora", "pissa", "loftq", "olora-iters2"]


@pytest.mark.parametrize("init", INITS)
def test_the_reference_is_the_initial_model_for_every_init(chat_model_dir, tmp_path, init) -> None:
    """At step 0 the policy is the reference: DPO's rewards are 0 and its sigmoid loss is ln 2
    (fp32, CPU), and the trainable adapter is the initial one, bit for bit and in its own dtype
    (TRL casts a 4-bit model's adapter to bf16: that cast is undone)."""
    model, trainer, _ = step0_trainer(chat_model_dir, tmp_path, init)
    state = model.qolora_states["default"]
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
            assert torch.equal(p, params[name.replace(".default.", f".{REFERENCE_ADAPTER}.")]), name
    if state.factors:  # a factored init: the adapter holds B0, A0 exactly
        layer, (b0, a0) = next(iter(state.factors.items()))
        assert torch.equal(params[f"base_model.model.{layer}.lora_B.default.weight"], b0)
    m = trainer.evaluate()
    assert abs(m["eval_rewards/chosen"]) < 1e-6 and abs(m["eval_rewards/rejected"]) < 1e-6, m
    assert abs(m["eval_loss"] - math.log(2)) < 1e-6, m


@pytest.mark.parametrize("init", ["olora", "lora"])
def test_negative_control_adapters_off_is_not_the_initial_model_for_a_factored_init(
    chat_model_dir, tmp_path, init
) -> None:
    """The reference most tools use, the policy with its adapters switched off, is the residual
    base W - s·B0·A0 for OLoRA: the step-0 check fails on it. For plain LoRA (B0 = 0) it holds."""
    model, trainer, _ = step0_trainer(chat_model_dir, tmp_path, init)
    model.delete_adapter(REFERENCE_ADAPTER)  # TRL then takes the reference with the adapters disabled
    m = trainer.evaluate()
    off = max(abs(m["eval_rewards/chosen"]), abs(m["eval_rewards/rejected"]), abs(m["eval_loss"] - math.log(2)))
    assert (off > 1e-3) if init == "olora" else (off < 1e-6), m


def test_negative_control_trls_bf16_cast_moves_the_start(chat_model_dir, tmp_path, monkeypatch) -> None:
    """Without ``exact_start_`` the trainable adapter TRL leaves is bf16, not the initial factors."""
    import qolora.training.preference as pref

    monkeypatch.setattr(pref, "exact_start_", lambda model, start: None)
    model, _, _ = step0_trainer(chat_model_dir, tmp_path, "olora")
    b = next(p for n, p in model.named_parameters() if n.endswith("lora_B.default.weight"))
    assert b.dtype == torch.bfloat16


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_trls_prompt_is_what_generate_renders(chat_model_dir, tmp_path, template) -> None:
    """TRL tokenizes the pairs; its prompt ids are the ids ``qolora generate`` gives the same
    conversation (docs/design.md, "train and serve render alike")."""
    _, trainer, rows = step0_trainer(chat_model_dir, tmp_path, "olora", template)
    enc = Encoder(make_tokenizer(), 32, template)
    for i in range(3):
        assert trainer.train_dataset[i]["prompt_ids"] == enc.prompt_ids(rows.rows[i]["prompt"], "preference")


@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "kto", "simpo"])
def test_every_method_trains_and_records_its_rewards_and_reloads_exactly(
    chat_model_dir, tmp_path, monkeypatch, method
) -> None:
    seen = {}

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            model.eval()
            with torch.no_grad():
                seen["logits"] = model(input_ids=PROBE).logits.clone()  # the trained model, as it ends
            seen["base"] = base_digests(model)

    add_trainer_callback(monkeypatch, Capture())
    final = train(pref_config(chat_model_dir, tmp_path, method, max_steps=4))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["training"]["method"] == method and len(m["history"]) == 4
    if method in ("dpo", "ipo", "kto"):
        start = m["eval"][0]
        assert start["step"] == 0 and abs(start["eval_rewards/chosen"]) < 1e-6, start
    if method != "kto":
        assert all("rewards/margins" in h for h in m["history"]) and "eval_rewards/margins" in m["eval"][-1]
    meta = json.loads((final / "qolora.json").read_text())
    assert meta["training"]["method"] == method
    from safetensors import safe_open

    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if f".{REFERENCE_ADAPTER}." in k]
    reloaded = load_adapter(final)
    with torch.no_grad():
        got = reloaded(input_ids=PROBE).logits
    assert torch.equal(got, seen["logits"])
    # the base never moved (invariant 9): the trained model's 4-bit layers are the ones a reload
    # rebuilds from the initial factors, bit for bit (TRL's reference adapter re-quantized nothing)
    assert seen["base"] == base_digests(reloaded) and len(seen["base"]) == 14
    if method == "dpo":  # the merged export of a preference-tuned adapter is the trained model
        from transformers import AutoModelForCausalLM

        from qolora.export import export_merged

        export_merged(final, tmp_path / "merged", dtype="float32", progress=False)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        with torch.no_grad():
            assert (plain(input_ids=PROBE).logits - seen["logits"]).abs().max() < 1e-3


KILLER = TRAIN_KILLER.replace("build_trainer", "build_preference_trainer")  # kill -9 after checkpoint-4


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_resume_after_kill_9_gives_the_uninterrupted_losses(chat_model_dir, tmp_path, method) -> None:
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir()
    kill_dir.mkdir()
    train(pref_config(chat_model_dir, ref_dir, method, max_steps=7))
    want = json.loads((ref_dir / "run" / "metrics.json").read_text())["history"]

    cfg = pref_config(chat_model_dir, kill_dir, method, max_steps=7)
    killed_after_checkpoint_4(cfg, kill_dir, KILLER)
    train(cfg, resume=True)
    got = json.loads((kill_dir / "run" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in got] == list(range(1, 8))
    assert [h["loss"] for h in got] == [h["loss"] for h in want]
    key = "rewards/margins" if method == "dpo" else "kl"
    assert [h.get(key) for h in got] == [h.get(key) for h in want]


def test_the_guard_bounds_a_preference_loss_from_its_start_not_its_lowest() -> None:
    """A DPO loss starts at ln 2 and may fall towards 0: noise around a tiny loss is no blow-up
    (SFT's rule, ``factor`` x the lowest level, would stop it), while a loss held above 3 ln 2 is."""
    low = DivergenceGuard(3.0, 5, None, from_start=True)
    sft_rule = DivergenceGuard(3.0, 5, None)
    noisy = [math.log(2)] + [0.5 * 0.7**i for i in range(60)] + [0.05 + 0.25 * (i % 2) for i in range(30)]
    for i, loss in enumerate(noisy, 1):
        low.observe(i, loss, 1.0)
    with pytest.raises(DivergedError):
        for i, loss in enumerate(noisy, 1):
            sft_rule.observe(i, loss, 1.0)
    g = DivergenceGuard(3.0, 5, None, from_start=True)
    with pytest.raises(DivergedError, match=r"3 x the first step's loss 0\.6931"):
        for i, loss in enumerate([math.log(2)] * 12 + [2.5] * 40, 1):
            g.observe(i, loss, 1.0)


def test_a_diverging_dpo_run_stops_in_one_line(chat_model_dir, tmp_path, monkeypatch) -> None:
    """From step 4 the DPO loss TRL computes is held at 4.7 (about 7 ln 2; a tiny random model
    does not blow up on its own: at lr 30 it collapses to a uniform guess, which DPO's loss cannot
    see, since the reference is nearly uniform too). The guard stops the run in one line, at the
    patience, with no adapter written."""
    from trl import DPOTrainer

    compute = DPOTrainer.compute_loss

    def blown_up(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute(self, model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.state.global_step >= 3:
            return loss * 0 + 4.7
        return loss

    monkeypatch.setattr(DPOTrainer, "compute_loss", blown_up)
    cfg = pref_config(chat_model_dir, tmp_path, "dpo", max_steps=30, divergence_patience=3, eval_steps=100)
    with pytest.raises(DivergedError, match=r"above 3 x the first step's loss 0\.69.* for 3 steps") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "adapter").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped"]["reason"] == "diverged"


def test_rows_that_do_not_suit_the_method_are_one_line(chat_model_dir, tmp_path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n")
    p.write_text(p.read_text() + json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl row 2: field 'rejected' equals 'chosen'"):
        load_rows(p)
    assert len(load_rows(p, skip_bad_rows=True).rows) == 1
    cfg = pref_config(chat_model_dir, tmp_path, "dpo")
    sft_rows = tmp_path / "sft.jsonl"
    sft_rows.write_text((json.dumps({"prompt": "hi", "completion": "yes"}) + "\n") * 4)
    cfg.data.train = str(sft_rows)
    with pytest.raises(DataError, match=r"train.method=dpo needs preference or sharegpt_preference rows"):
        train(cfg)
    (tmp_path / "k").mkdir()
    cfg = pref_config(chat_model_dir, tmp_path / "k", "kto")
    cfg.train.method = "sft"
    with pytest.raises(DataError, match=r"kto rows carry desirable / undesirable labels"):
        train(cfg)


def test_a_missing_or_old_trl_is_one_line_before_any_model_loads(monkeypatch) -> None:
    import importlib.metadata

    from qolora.config import ConfigError
    from qolora.training.preference import check_trl

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    check_trl("sft")  # SFT needs no TRL
    check_trl("dpo", "robust")
    with pytest.raises(
        ConfigError, match=r"pref.loss_type: 'sigmod' is not one of TRL .*'s DPO losses: sigmoid, hinge"
    ):
        check_trl("dpo", "sigmod")
    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ConfigError, match=r"train.method=dpo runs TRL's trainer: pip install 'qolora\[trl\]'"):
        check_trl("dpo")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0.0")
    with pytest.raises(ConfigError, match=r"needs trl>=1.16, found 1.0.0"):
        check_trl("kto")


def grpo_config(model_dir, tmp_path, **train_kw):
    """GRPO on the tiny chat model: 4 completions per prompt, 8 tokens, beta 0.04, two built-in rewards."""
    cfg = pref_config(model_dir, tmp_path, "dpo", max_steps=7, batch_size=4, eval_steps=7, **train_kw)
    cfg.train.method, cfg.train.rewards = "grpo", ["length:3", "exact_match"]
    cfg.grpo.max_completion_length, cfg.grpo.beta = 8, 0.04
    return cfg


@pytest.fixture(scope="module")
def grpo_run(chat_model_dir, tmp_path_factory):
    """An uninterrupted GRPO run, with its 4-bit base's digests after every optimizer step."""
    root = tmp_path_factory.mktemp("grpo")
    digests = []

    class Capture(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            digests.append(base_digests(model))

    with pytest.MonkeyPatch.context() as mp:
        add_trainer_callback(mp, Capture())
        final = train(grpo_config(chat_model_dir, root))
    return {
        "root": root,
        "final": final,
        "digests": digests,
        "metrics": json.loads((root / "run" / "metrics.json").read_text()),
    }


def test_grpo_trains_on_the_exact_reference_and_keeps_the_base(grpo_run) -> None:
    """GRPO (TRL's GRPOTrainer, beta > 0): completions are sampled from the 4-bit base plus the live
    adapter; the KL to the reference is exactly 0 at step 1 (the reference is the initial model);
    the base's 4-bit layers are bit-identical to a reload's after every step; the reward is
    recorded per function, with the time spent generating."""
    m, final = grpo_run["metrics"], grpo_run["final"]
    h = m["history"]
    assert [x["step"] for x in h] == list(range(1, 8)) and h[0]["kl"] == 0.0
    assert all("rewards/length_3/mean" in x and "rewards/exact_match/mean" in x and "reward" in x for x in h)
    assert all(0 < x["generation_s"] < x["step_time"] for x in h) and 0 < m["generation_share"] < 1
    e = m["eval"]  # held-out prompts: TRL's eval samples and scores them, at step 0 and at the end
    assert [x["step"] for x in e] == [0, 7] and e[0]["eval_kl"] == 0.0
    assert all("eval_reward" in x and "eval_rewards/length_3/mean" in x for x in e)
    assert m["training"]["method"] == "grpo" and m["divergence_guard"]["finite_only"]
    reload = base_digests(load_adapter(final))
    assert len(grpo_run["digests"]) == 7 and all(d == reload for d in grpo_run["digests"])
    assert json.loads((final / "qolora.json").read_text())["training"]["num_generations"] == 4


def test_grpo_resume_after_kill_9_reproduces_the_rewards(chat_model_dir, grpo_run) -> None:
    """A run killed after checkpoint-4 and resumed gives the uninterrupted rewards, losses and KL
    exactly. Completions are a function of (seed, step, completion index), not of the RNG: resumed
    from a checkpoint with its RNG state deleted, the rewards are still exact (TRL's sampling on the
    RNG gives others from step 5); the loss and KL then agree to 1e-6, as TRL shuffles the batch's
    rows with the RNG and sums them in another order."""
    kill_dir = grpo_run["root"] / "kill"
    kill_dir.mkdir()
    cfg = grpo_config(chat_model_dir, kill_dir)
    killed_after_checkpoint_4(cfg, kill_dir, KILLER)
    no_rng = grpo_run["root"] / "no_rng"
    shutil.copytree(kill_dir / "run", no_rng / "run")
    ckpt = no_rng / "run" / "checkpoint-4"
    rng = list(ckpt.glob("rng_state*.pth"))
    assert rng
    for f in rng:
        f.unlink()
    run_dir.seal(ckpt)  # still the newest complete checkpoint: the resume starts there
    want = grpo_run["metrics"]["history"]
    keys = ("reward", "rewards/length_3/mean", "reward_std", "completions/mean_length", "loss", "kl")
    for d in (kill_dir, no_rng):
        cfg.train.output_dir = str(d / "run")
        train(cfg, resume=True)
        assert not list((d / "run").glob("checkpoint-4.*"))  # resumed from checkpoint-4
        got = json.loads((d / "run" / "metrics.json").read_text())["history"]
        assert [h["step"] for h in got] == list(range(1, 8))
        ev = json.loads((d / "run" / "metrics.json").read_text())["eval"]
        assert [x["eval_reward"] for x in ev] == [x["eval_reward"] for x in grpo_run["metrics"]["eval"]]
        for k in keys:
            if d == kill_dir or k not in ("loss", "kl"):
                assert [h[k] for h in got] == [h[k] for h in want], (d.name, k)
            else:
                assert max(abs(x[k] - y[k]) for x, y in zip(got, want, strict=True)) < 1e-6, k


def test_a_bad_reward_is_one_line_before_any_model_loads(tmp_path, monkeypatch) -> None:
    from qolora.config import ConfigError
    from qolora.training.rewards import resolve_all

    (tmp_path / "myrewards.py").write_text(
        "def good(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def narrow(completions):\n    return [1.0] * len(completions)\n"
        "def columns_only(prompts, completions, answer):\n    return [1.0] * len(completions)\n"
    )
    rows = [{"prompt": "hi", "answer": "yes"}, {"prompt": "what is python", "answer": "code"}]
    assert len(resolve_all(["myrewards:good", "exact_match", "format:^a", "length:5"], tmp_path, rows)) == 4
    for spec, msg in [
        ("nosuch:f", "cannot import nosuch"),
        ("myrewards:missing", "myrewards has no function missing"),
        ("myrewards:short", "returned 1 values for 2 completions"),
        ("myrewards:narrow", r"TRL calls it as f\(prompts, completions, \*\*columns\)"),
        ("myrewards:columns_only", r"TRL calls it as .*completion_ids"),  # TRL also passes completion_ids, ...
        ("length:0", "expected length:<words>"),
        ("format:(", "not a regular expression"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            resolve_all([spec], tmp_path, rows)
    with pytest.raises(ConfigError, match="train.rewards: grpo needs at least one reward"):
        pref_config(tmp_path, tmp_path, "grpo").__post_init__()


def test_a_grpo_global_batch_that_splits_a_group_is_one_line(tmp_path) -> None:
    from qolora.config import ConfigError
    from qolora.training.preference import check_grpo_batch

    cfg = pref_config(tmp_path, tmp_path, "dpo", batch_size=2)
    cfg.train.method = "grpo"
    check_grpo_batch(cfg, 2)  # 2 ranks of 2: one group of 4
    with pytest.raises(ConfigError, match=r"batch_size x grad_accum x ranks = 2 x 1 x 1 = 2 is not a multiple"):
        check_grpo_batch(cfg, 1)
