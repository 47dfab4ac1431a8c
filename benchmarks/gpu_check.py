"""The GPU proof's parts, one process each (``scripts/gpu_check.sh`` runs them in order, each in its
own time box, and then ``summary``).

    python benchmarks/gpu_check.py PART --out DIR [--rehearse] [--box SECONDS]

Parts, in the order the mission depends on them:
- ``env``: versions, the GPU, and that every QOLoRA module and bitsandbytes' CUDA kernels load;
- ``tests``: ``pytest -m gpu`` with a per-test timeout, with what each test measured;
- ``memory``: QOLoRA against PEFT + Trainer QLoRA on a Llama-2-7B-shaped model built in 4-bit
  (seq 2048, batch 1, r 16, all-linear, checkpointing, paged AdamW 8-bit, bf16): peak allocated
  and reserved memory and tokens/s, with ``qolora plan``'s prediction beside each;
- ``context``: the longest sequence that trains under a 24 GiB cap for the Llama-3-8B shape,
  with and without activation offloading, by a short bisection, beside the plan's prediction;
- ``init``: OLoRA init time on a 7B-shaped checkpoint against a plain NF4 load of it.

Each part writes ``DIR/<part>.json`` as it goes (``status`` running, then ok or failed), so a
part killed by its time box keeps what it measured; ``mark`` then records the timeout. With
``--rehearse`` every part runs on the CPU with tiny shapes and writes the same keys (CI).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PARTS = ("env", "tests", "memory", "context", "init")
COMMON = ("part", "status", "seconds", "device", "rehearse", "error")
SCHEMA = {  # the keys every part's JSON has, on the GPU and in the rehearsal
    "env": ("python", "versions", "gpu", "cuda", "import_errors", "bnb_cuda_ok", "wheels"),
    "tests": ("passed", "failed", "skipped", "timeout_s", "results", "records"),
    "memory": ("shape", "seq", "rank", "steps", "runs"),
    "context": ("shape", "cap_bytes", "modes"),
    "init": ("shape", "layers", "repeats", "plain_load_s", "qolora_load_s", "init_only_s", "ratio"),
    "summary": ("parts", "goals", "rows"),
}
RUN_KEYS = ("peak_allocated", "peak_reserved", "tokens_per_s", "step_s", "plan_bytes", "plan_ratio", "optimizer")
MODE_KEYS = ("max_seq", "plan_max_seq", "probes")
BOXES = {"env": 30, "tests": 120, "memory": 110, "context": 120, "init": 60}  # seconds on a GPU
REHEARSE_BOXES = {"env": 60, "tests": 300, "memory": 120, "context": 120, "init": 90}
VERSIONED = (
    "torch transformers peft accelerate bitsandbytes datasets safetensors dill multiprocess pyarrow "
    "tokenizers huggingface_hub numpy yaml tqdm matplotlib pytest pytest_timeout"
).split()


class Part:
    """One part's JSON, rewritten (atomically) at every update."""

    def __init__(self, out: Path, name: str, rehearse: bool) -> None:
        self.path, self.t0 = out / f"{name}.json", time.perf_counter()
        self.data: dict[str, Any] = {"part": name, "status": "running", "seconds": 0.0, "rehearse": rehearse}
        self.data |= {"device": None, "error": None} | {k: None for k in SCHEMA[name]}
        self.update()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, **kv: Any) -> None:
        self.data.update(kv)
        self.data["seconds"] = round(self.elapsed(), 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------- env


def part_env(p: Part, rehearse: bool, box: float) -> None:
    import importlib
    import platform

    import torch

    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - recorded, not raised: the point is to see them all
            versions[name] = f"missing ({type(e).__name__}: {e})"
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory": props.total_memory,
            "bf16": torch.cuda.is_bf16_supported(),
        }
    p.update(python=platform.python_version(), versions=versions, gpu=gpu, cuda=torch.version.cuda, device=_device())
    errors = {}
    for mod in (
        "qolora",
        "qolora.cli",
        "qolora.training.run",
        "qolora.training.data",
        "qolora.export",
        "qolora.generate",
        "qolora.plan",
    ):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            errors[mod] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ok = None
    if torch.cuda.is_available():
        from qolora import quant

        W = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
        lin = quant.linear4bit(W, quant.QuantSettings("nf4", 64, True, torch.uint8, torch.bfloat16), torch.bfloat16)
        y = lin(torch.randn(4, 128, device="cuda", dtype=torch.bfloat16))
        ok = bool(torch.isfinite(y).all()) and lin.weight.device.type == "cuda"
    wheels = sorted(os.listdir(".whl")) if os.path.isdir(".whl") else []
    p.update(import_errors=errors, bnb_cuda_ok=ok, wheels=wheels)
    if errors:
        raise RuntimeError(f"{len(errors)} QOLoRA module(s) do not import: {', '.join(errors)}")


# -------------------------------------------------------------------------------------- tests


def part_tests(p: Part, rehearse: bool, box: float) -> None:
    import subprocess
    import tempfile
    import xml.etree.ElementTree as ET

    per_test = 180 if rehearse else 120
    with tempfile.TemporaryDirectory() as tmp:
        rec, xml = Path(tmp) / "records.json", Path(tmp) / "junit.xml"
        env = {**os.environ, "QOLORA_GPU_RECORD": str(rec)}
        if rehearse:
            env["QOLORA_GPU_REHEARSE"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--timeout", str(per_test)]
        p.update(device=_device(), timeout_s=per_test)
        proc = subprocess.run([*cmd, f"--junitxml={xml}", "tests"], env=env, capture_output=True, text=True)
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
        results = {}
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}.get(
                    bad.tag if bad is not None else "", "passed"
                )
                msg = (bad.get("message") or "").splitlines()[0][:300] if bad is not None and bad.get("message") else ""
                results[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0)), "message": msg}
        counts = {k: sum(r["outcome"] == k for r in results.values()) for k in ("passed", "failed", "skipped")}
        records = json.loads(rec.read_text()) if rec.exists() else {}
        p.update(**counts, results=results, records=records)
        if proc.returncode != 0 or not results:
            raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: {counts['failed']} failed")


# ------------------------------------------------------------------------- memory and context


class _Tok:
    """What the Trainer and the collator need of a tokenizer, for random-token data."""

    pad_token_id = 0
    eos_token_id = 0


def _examples(n: int, seq: int, vocab: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(seq)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "length": seq})
    return rows


def _qolora_cfg(out: str, steps: int, rank: int, offload: bool = False) -> Any:
    from qolora.config import config_from_dict

    return config_from_dict(
        {
            "model": "random-weights",  # built in memory; never read
            "adapter": {"r": rank, "alpha": rank},
            "data": {"train": "unused.jsonl"},
            "train": {
                "output_dir": out,
                "max_steps": steps,
                "batch_size": 1,
                "lr": 1e-4,
                "save_steps": 10**6,
                "eval_steps": 10**6,
                "logging_steps": 10**6,
                "divergence_check": False,
                "offload_activations": offload,
            },
        }
    )


def _build(shape: dict, kind: str, rank: int) -> Any:
    """The 4-bit model (random weights) with QOLoRA's OLoRA adapter or PEFT's plain LoRA, as each recipe has it."""
    import torch
    from gpu_7b import build_4bit
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    import qolora
    from qolora.training.trainer import prepare_for_training_

    dtype = torch.bfloat16 if _device() == "cuda" else torch.float32
    base = build_4bit(shape, _device(), dtype)
    if kind == "qolora":
        prepare_for_training_(base, True)
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights="olora")
        return qolora.get_qolora_model(base, cfg, init_source="dequantized", progress=False)
    base = prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", task_type="CAUSAL_LM"))


def _trainer(kind: str, model: Any, examples: list, out: str, steps: int, rank: int, offload: bool = False) -> Any:
    from transformers import Trainer, TrainingArguments

    from qolora.training.harness import checkpointing_args
    from qolora.training.tokenize import Collator
    from qolora.training.trainer import build_trainer

    if kind == "qolora":
        return build_trainer(model, _Tok(), examples, None, _qolora_cfg(out, steps, rank, offload))
    cuda = _device() == "cuda"
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        **checkpointing_args(True),
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(0))


def _train(trainer: Any) -> dict[str, Any]:
    """Train; the step times after the first, the peaks, and the optimizer's class."""
    import resource

    import torch
    from transformers import TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            _sync()
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    _free()
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    cuda = torch.cuda.is_available()
    return {
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "cpu_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "optimizer": f"{type(opt).__module__}.{type(opt).__name__}",
    }


def _plan(shape: dict, seq: int, rank: int, **kw: Any) -> Any:
    """``qolora plan`` for the shape at batch 1 under 24 GiB (``kw``: chunked_ce, offload)."""
    from qolora.plan import plan

    return plan(shape | {"tie_word_embeddings": False}, seq, 1, rank, "24GiB", **kw)


def _plan_bytes(shape: dict, seq: int, rank: int, chunked: bool) -> tuple[int, int]:
    """The plan's total, and that total without the CUDA context (which the allocator's peak cannot see)."""
    p = _plan(shape, seq, rank, chunked_ce=chunked)
    return p.total_bytes, p.total_bytes - p.components["CUDA context and allocator overhead"]


def part_memory(p: Part, rehearse: bool, box: float) -> None:
    import tempfile

    from gpu_7b import SHAPES

    shape_name, seq, steps, rank = ("tiny", 64, 3, 16) if rehearse else ("7b", 2048, 5, 16)
    shape = SHAPES[shape_name]
    p.update(device=_device(), shape=shape_name, seq=seq, rank=rank, steps=steps, runs={})
    runs: dict[str, Any] = {}
    for kind in ("qolora", "peft"):  # QOLoRA first: it is the figure the goals are about
        model = _build(shape, kind, rank)
        with tempfile.TemporaryDirectory() as out:
            r = _train(_trainer(kind, model, _examples(steps, seq, shape["vocab_size"]), out, steps, rank))
        r["tokens_per_s"] = seq / r["step_s"] if r["step_s"] else None
        total, seen = _plan_bytes(shape, seq, rank, chunked=kind == "qolora")
        r["plan_bytes"], r["plan_total_bytes"] = seen, total
        r["plan_ratio"] = seen / r["peak_allocated"] if r["peak_allocated"] else None
        runs[kind] = r
        p.update(runs=runs)
        del model
        _free()


def part_context(p: Part, rehearse: bool, box: float) -> None:
    import tempfile

    import torch
    from gpu_7b import SHAPES

    from qolora.plan import parse_bytes

    shape_name, rank = ("tiny", 16) if rehearse else ("8b", 16)
    shape = SHAPES[shape_name]
    cap = parse_bytes("24GiB")
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    # the rehearsal cannot run out of memory on the CPU: a length limit stands in for the cap
    fake_limit, grain = (384, 64) if rehearse else (None, 2048)
    p.update(device=_device(), shape=shape_name, cap_bytes=cap, modes={})
    model = _build(shape, "qolora", rank)
    modes: dict[str, Any] = {}

    def fits(seq: int, offload: bool, mode: dict[str, Any]) -> bool:
        t0 = time.perf_counter()
        ok = True
        try:
            with tempfile.TemporaryDirectory() as out:
                _train(_trainer("qolora", model, _examples(1, seq, shape["vocab_size"]), out, 1, rank, offload))
        except torch.OutOfMemoryError:
            ok = False
        for q in model.parameters():
            q.grad = None
        _free()
        ok = ok and (fake_limit is None or seq <= fake_limit)
        mode["probes"].append({"seq": seq, "fits": ok, "seconds": round(time.perf_counter() - t0, 2)})
        p.update(modes=modes)
        return ok

    for offload in (False, True):
        name = "offload" if offload else "no_offload"
        share = (box - p.elapsed()) / (2 if not offload else 1) * 0.9  # each mode its own share of the box
        t_mode = time.perf_counter()
        predicted = _plan(shape, 1, rank, offload=offload).max_seq_len
        mode = modes[name] = {"max_seq": None, "plan_max_seq": predicted, "probes": []}
        start = max(grain, predicted // grain * grain) if not rehearse else 256
        lo, hi = 0, None
        seq = start
        while time.perf_counter() - t_mode < share and len(mode["probes"]) < 8:
            if fits(seq, offload, mode):
                lo = seq
                seq = seq * 5 // 4 // grain * grain if hi is None else (lo + hi) // 2 // grain * grain
            else:
                hi = seq
                seq = (lo + hi) // 2 // grain * grain if lo else max(grain, seq * 3 // 4 // grain * grain)
            if hi is not None and hi - lo <= grain:
                break
            if seq <= lo or (hi is not None and seq >= hi):
                break
        mode["max_seq"] = lo or None
        mode["bracket"] = [lo, hi]
        p.update(modes=modes)


# --------------------------------------------------------------------------------------- init


def _write_checkpoint(shape: dict, layers: int, out: Path) -> None:
    """A bf16 safetensors checkpoint of the shape with ``layers`` decoder layers, random weights
    made on the device one tensor at a time (no fp32 model is built)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(shape | {"num_hidden_layers": layers}), tie_word_embeddings=False)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    g = torch.Generator(device=_device()).manual_seed(0)
    dtype = torch.bfloat16 if _device() == "cuda" else torch.float32
    tensors = {}
    for name, t in meta.state_dict().items():
        if "norm" in name:
            tensors[name] = torch.ones(t.shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(t.shape, device=_device(), generator=g, dtype=dtype) * 0.02).cpu()
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def part_init(p: Part, rehearse: bool, box: float) -> None:
    import tempfile

    from gpu_7b import SHAPES
    from peft import LoraConfig

    import qolora
    from qolora import quant

    shape_name, layers = ("tiny", 2) if rehearse else ("7b", 8)
    p.update(device=_device(), shape=shape_name, layers=layers, repeats=0)
    plain, full, init_only = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        _write_checkpoint(SHAPES[shape_name], layers, ckpt)
        p.update(write_s=round(time.perf_counter() - t0, 2))
        cfg = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights="olora")
        for rep in range(3):  # A B A B ...; stop when the box would not hold another pair
            if rep and p.elapsed() + (p.elapsed() - p.data["write_s"]) / rep > box * 0.9:
                break
            _free()
            t0 = time.perf_counter()
            m = quant.load_quantized(ckpt, compute_dtype="auto")
            _sync()
            plain.append(time.perf_counter() - t0)
            del m
            _free()
            t0 = time.perf_counter()
            m = quant.load_quantized(ckpt, compute_dtype="auto")
            _sync()
            t1 = time.perf_counter()
            m = qolora.get_qolora_model(m, cfg, init_source="checkpoint", progress=False)
            _sync()
            full.append(time.perf_counter() - t0)
            init_only.append(time.perf_counter() - t1)
            sources = m.qolora_states["default"].report.sources()
            del m
            med = statistics.median
            p.update(
                repeats=rep + 1,
                plain_load_s=med(plain),
                qolora_load_s=med(full),
                init_only_s=med(init_only),
                ratio=med(full) / med(plain),
                all_runs={"plain": plain, "qolora": full},
                sources=sources,
            )


# ------------------------------------------------------------------------------ mark, summary


def mark(out: Path, part: str, rc: int) -> None:
    """After a part's process ended: record a timeout or a crash that left no final status."""
    path = out / f"{part}.json"
    data = json.loads(path.read_text()) if path.exists() else None
    if data is None:
        data = {"part": part, "status": "running", "seconds": None, "device": None, "rehearse": None, "error": None}
        data |= {k: None for k in SCHEMA[part]}
    if data["status"] == "running" or (rc != 0 and data["status"] == "ok"):
        data["status"] = "timeout" if rc in (124, 137) else "failed"
        data["error"] = data["error"] or (
            f"time box reached (exit {rc})" if rc in (124, 137) else f"exited {rc} without a result"
        )
    data["exit_code"] = rc
    path.write_text(json.dumps(data, indent=1, default=str))


def summary(out: Path, rehearse: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common

    parts = {}
    for name in PARTS:
        path = out / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else {"status": "missing"}
    GiB = 1 << 30
    goals: dict[str, Any] = {}
    rows = []
    env = parts["env"]
    gpu = (env.get("gpu") or {}).get("name") or "no GPU (rehearsal)"
    vers = env.get("versions") or {}
    where = f"{gpu}, torch {vers.get('torch')}, bitsandbytes {vers.get('bitsandbytes')}"
    cmd = "`bash scripts/gpu_check.sh" + (" --rehearse" if rehearse else "") + " OUT`"
    t = parts["tests"]
    if t.get("results"):
        goals["gpu tests pass"] = t["failed"] == 0 and t["passed"] > 0
        rows.append(_common.row("pytest -m gpu", f"{t['passed']} passed, {t['failed']} failed", cmd, where))
    runs = parts["memory"].get("runs") or {}
    q, b = runs.get("qolora"), runs.get("peft")
    if q and q.get("peak_allocated"):
        goals["QOLoRA peak <= 6 GiB"] = q["peak_allocated"] <= 6 * GiB
        goals["plan within 10% of the peak"] = abs(q["plan_ratio"] - 1) <= 0.10
    if q and b and q.get("tokens_per_s") and b.get("tokens_per_s"):
        goals["tokens/s >= 1.0x PEFT+Trainer"] = q["tokens_per_s"] >= b["tokens_per_s"]

    def gib(x: Any) -> str:
        return f"{x / GiB:.2f} GiB" if x else "n/a"

    for kind, r in runs.items():
        rows.append(
            _common.row(
                f"{parts['memory']['shape']} 4-bit, seq {parts['memory']['seq']}, r {parts['memory']['rank']}: {kind}",
                f"peak allocated {gib(r.get('peak_allocated'))} (plan {gib(r.get('plan_bytes'))})",
                f"reserved {gib(r.get('peak_reserved'))}",
                f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else "n/a",
                cmd,
                where,
            )
        )
    for name, m in (parts["context"].get("modes") or {}).items():
        rows.append(
            _common.row(
                f"{parts['context']['shape']} under 24 GiB, {name.replace('_', ' ')}",
                f"max seq {m.get('max_seq')} (plan {m.get('plan_max_seq')})",
                f"{len(m.get('probes') or [])} probes",
                cmd,
                where,
            )
        )
    i = parts["init"]
    if i.get("ratio"):
        goals["init <= 1.1x plain NF4 load"] = i["ratio"] <= 1.1
        rows.append(
            _common.row(
                f"{i['shape']} ({i['layers']} layers) load + OLoRA init vs plain NF4 load",
                f"{i['qolora_load_s']:.1f} s vs {i['plain_load_s']:.1f} s",
                f"**{i['ratio']:.2f}x**",
                f"median of {i['repeats']}",
                cmd,
                where,
            )
        )
    result = {
        "part": "summary",
        "rehearse": rehearse,
        "date": _common.today(),
        "parts": {
            k: {"status": v.get("status"), "seconds": v.get("seconds"), "error": v.get("error")}
            for k, v in parts.items()
        },
        "goals": goals,
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    for k, v in result["parts"].items():
        print(f"{k:>8}: {v['status']} in {v['seconds']} s" + (f" ({v['error']})" if v.get("error") else ""))
    for k, v in goals.items():
        print(f"goal {'met' if v else 'NOT met'}: {k}")
    print("\n".join(rows))
    return result


PART_FUNCS = {"env": part_env, "tests": part_tests, "memory": part_memory, "context": part_context, "init": part_init}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=(*PARTS, "mark", "summary", "box"))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("--box", type=float, default=None)
    ap.add_argument("--of", default=None, help="mark, box: which part")
    ap.add_argument("--rc", type=int, default=0)
    args = ap.parse_args()
    if args.part == "box":  # the shell asks each part's time box
        print((REHEARSE_BOXES if args.rehearse else BOXES)[args.of])
        return 0
    if args.part == "mark":
        mark(args.out, args.of, args.rc)
        return 0
    if args.part == "summary":
        summary(args.out, args.rehearse)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    box = args.box or (REHEARSE_BOXES if args.rehearse else BOXES)[args.part]
    p = Part(args.out, args.part, args.rehearse)
    try:
        PART_FUNCS[args.part](p, args.rehearse, box)
    except BaseException as e:
        p.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
        raise
    p.update(status="ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
