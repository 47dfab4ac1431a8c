"""Data at scale: time to the first training step and peak RSS, today's data path against a git ref's.

    python benchmarks/data_scale.py --rows 1000000 [--ref 0070c84] [--impls new,old]

Generates N synthetic alpaca rows (about 150 tokens each with the demo tokenizer; deterministic)
and, per implementation, runs `qolora train` on the demo model (examples/sft/demo.yaml, 1 step) in a
fresh process twice: cold (empty HF datasets cache) and warm (the same cache again). Each child
reports when the data was ready (validated and tokenized), when the first optimizer step ended,
and its peak RSS (and its worker processes'). "old" is the code at --ref, checked out in a
temporary git worktree. Needs `qolora prepare-demo`. Writes benchmarks/results/data_scale-*.json and
prints the BENCHMARKS.md rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "data_scale"

CHILD = r"""
import json, os, resource, sys, time
import qolora
assert os.path.realpath(qolora.__file__).startswith(os.path.realpath(os.environ["PYTHONPATH"])), qolora.__file__
t0 = time.perf_counter()
from transformers import TrainerCallback
import qolora.training.run as run
from qolora.config import load_config

marks = {}

def rss():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return own, kids

prepare = run.prepare_data
def timed_prepare(*a, **k):
    out = prepare(*a, **k)
    marks["data_ready_s"] = time.perf_counter() - t0
    marks["rss_at_data_ready"] = rss()[0]
    return out
run.prepare_data = timed_prepare

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        own, kids = rss()
        marks.update(first_step_s=time.perf_counter() - t0, peak_rss=own, peak_rss_workers=kids)
        print("RESULT " + json.dumps(marks), flush=True)
        os._exit(0)

build = run.build_trainer
def build_with_callback(*a, **k):
    trainer = build(*a, **k)
    trainer.add_callback(FirstStep())
    return trainer
run.build_trainer = build_with_callback
cfg = load_config("examples/sft/demo.yaml", [f"data.train={sys.argv[1]}", "data.eval=demo/data/eval.jsonl",
    "data.max_eval_rows=8", "train.max_steps=1", "train.eval_steps=1000", f"train.output_dir={sys.argv[2]}"])
run.train(cfg)
"""


def words() -> list[str]:
    text = Path("demo/data/train.jsonl").read_text() + Path("demo/data/pydoc_train.jsonl").read_text()
    vocab = sorted({w.strip('.,?!:;"()[]{}\\') for w in text.split() if w.isascii() and w.isalpha()})
    return vocab or ["word"]


def generate(n: int, path: Path) -> None:
    if path.is_file():
        return
    vocab, rng = words(), random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(n):
            row = {
                "instruction": " ".join(rng.choices(vocab, k=14)) + "?",
                "input": " ".join(rng.choices(vocab, k=rng.choice([0, 12]))),
                "output": " ".join(rng.choices(vocab, k=70)) + ".",
            }
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)


def child(src: Path, data: Path, cache: Path, out: Path) -> dict:
    # cwd too: `python -c` puts the working directory before PYTHONPATH on sys.path
    env = {**os.environ, "PYTHONPATH": str(src), "HF_DATASETS_CACHE": str(cache), "TQDM_DISABLE": "1"}
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(out)], cwd=src, env=env, capture_output=True, text=True
    )
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1], "returncode": p.returncode}
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ref", default="0070c84", help="git ref of today's (old) data path")
    ap.add_argument("--impls", default="new,old")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    data = RUNS / f"alpaca-{args.rows}.jsonl"
    generate(args.rows, data)
    results: dict = {"rows": args.rows, "bytes": data.stat().st_size, "ref": args.ref, "impls": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for impl in args.impls.split(","):
            src = ROOT
            if impl == "old":
                src = Path(tmp) / "ref"
                subprocess.run(["git", "worktree", "add", "--detach", str(src), args.ref], cwd=ROOT, check=True)
                (src / "demo").symlink_to(ROOT / "demo")
            cache = Path(tmp) / f"hf-{impl}"
            got = {k: child(src, data, cache, Path(tmp) / f"run-{impl}-{k}") for k in ("cold", "warm")}
            results["impls"][impl] = got
            if impl == "old":
                subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=ROOT, check=False)
            for k, m in got.items():
                if "error" in m:
                    cells = [m["error"][:80], "-", "-", "-", "-"]
                else:
                    cells = [
                        f"{m['data_ready_s']:.1f} s",
                        f"{m['rss_at_data_ready'] / 2**30:.2f} GiB",
                        f"{m['first_step_s']:.1f} s",
                        f"{m['peak_rss'] / 2**30:.2f} GiB",
                        f"{m['peak_rss_workers'] / 2**30:.2f} GiB",
                    ]
                label = "datasets (this commit)" if impl == "new" else f"Python lists ({args.ref})"
                rows.append(
                    _common.row(
                        f"{args.rows:,} alpaca rows, {label}, {k}",
                        *cells,
                        f"`{_common.command()}`",
                        _common.machine(),
                        _common.today(),
                    )
                )
    out = ROOT / "benchmarks" / "results" / f"data_scale-{args.rows}-{args.impls.replace(',', '-')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        "| run | data ready | peak RSS by then | first step done | peak RSS | peak RSS of workers | command | machine "
        "| date |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
