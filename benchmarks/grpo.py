"""GRPO on the demo model (examples/grpo.yaml): reward mean at the start and the end over seeds,
the held-out reward at step 0 and at the end (16 questions x 4 completions), s/step, and the share of
each step spent sampling completions; with seed 0 run again on TRL's own
sampling (``torch.multinomial`` on the RNG) as the baseline of the seeded sampler.

Every run is its own process (`qolora train examples/grpo.yaml train.seed=S`), one at a time.
Resumable: a run folder with a finished `adapter/` is reused. Needs `qolora prepare-demo --out demo`.

    python benchmarks/grpo.py [--seeds 0,1,2] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

RUNS = Path("runs/grpo-bench")
TRL_SAMPLING = (  # the CLI with the seeded sampler switched off (generation still timed)
    "import sys; from qolora.training.sampling import SeededGeneration; SeededGeneration.seeded = False; "
    "from qolora.cli import main; sys.argv[0] = 'qolora'; sys.exit(main())"
)


def run(name: str, seed: int, seeded: bool) -> dict:
    """One ``qolora train examples/grpo.yaml`` in its own process (reused when finished)."""
    out = RUNS / name
    if not (out / "adapter").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        head = [sys.executable, "-m", "qolora"] if seeded else [sys.executable, "-c", TRL_SAMPLING]
        cmd = [*head, "train", "examples/grpo.yaml", f"train.seed={seed}", f"train.output_dir={out}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"failed": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}
        (out / "wall_s").write_text(f"{time.perf_counter() - t0:.1f}")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_s"] = float((out / "wall_s").read_text()) if (out / "wall_s").is_file() else None
    return m


def sampler_cost(reps: int = 5) -> dict:
    """The seeded sampler's cost alone: the demo model in 4-bit generates 24 tokens for 8 rows
    (``min_new_tokens`` = 24, so both draw the same number of tokens), with TRL's sampling and with
    ``SeededSampler``, alternating, ``reps`` times each; the medians and their ratio."""
    import torch
    from transformers import AutoTokenizer, LogitsProcessorList

    from qolora.config import config_from_dict
    from qolora.training.run import load_base
    from qolora.training.sampling import SeededSampler

    model = load_base(config_from_dict({"model": "demo/model", "data": {"train": "demo/data/train.jsonl"}}))
    model.eval()
    ids = AutoTokenizer.from_pretrained("demo/model")(["What is a computer?"] * 8, return_tensors="pt")
    times: dict[str, list[float]] = {"trl": [], "seeded": []}
    for rep in range(reps):
        for name in times:
            kw = {}
            if name == "seeded":
                kw["logits_processor"] = LogitsProcessorList([SeededSampler((0, rep, False), list(range(8)), 1.0)])
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**ids, do_sample=True, max_new_tokens=24, min_new_tokens=24, top_k=0, top_p=1.0, **kw)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": med, "ratio": round(med["seeded"] / med["trl"], 3)}


def summary(m: dict) -> dict:
    h = m["history"]
    mean = lambda xs: round(statistics.fmean(xs), 3)  # noqa: E731
    return {
        "reward_start": mean([x["reward"] for x in h[:3]]),
        "reward_end": mean([x["reward"] for x in h[-3:]]),
        "eval_reward_start": round(m["eval"][0]["eval_reward"], 3) if m["eval"] else None,
        "eval_reward_end": round(m["eval"][-1]["eval_reward"], 3) if m["eval"] else None,
        "step_s_median": m["step_s_median"],
        "generation_s_median": round(statistics.median(x["generation_s"] for x in h), 3),
        "generation_share": m.get("generation_share"),
        "wall_s": m["wall_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-baseline", action="store_true", help="skip seed 0 on TRL's own sampling")
    args = ap.parse_args()
    plan = [(f"seeded-s{s}", int(s), True) for s in args.seeds.split(",")]
    if not args.no_baseline:
        plan.append(("trl-s0", 0, False))
    results = {}
    for name, seed, seeded in plan:
        m = run(name, seed, seeded)
        results[name] = {"failed": m["failed"]} if "failed" in m else {**summary(m), "history": m["history"]}
        print(name, {k: v for k, v in results[name].items() if k != "history"}, flush=True)
    cost = results["sampler_cost"] = sampler_cost()
    print("sampler cost", cost, flush=True)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    (Path("benchmarks/results") / "grpo.json").write_text(json.dumps(results, indent=1) + "\n")
    machine, date = _common.machine(), _common.today()
    print(
        _common.row(
            "sampling",
            "seed",
            "reward, mean of steps 1-3",
            "reward, mean of the last 3 steps",
            "held-out reward, step 0 -> end",
            "s/step (median)",
            "generation s/step (median)",
            "share of step time in generation",
            "wall",
            "machine",
            "date",
        )
    )
    print(_common.row(*["---"] * 11))
    for name, seed, seeded in plan:
        r = results[name]
        if "failed" in r:
            print(_common.row("seeded" if seeded else "TRL (RNG)", seed, r["failed"], *[""] * 8))
            continue
        print(
            _common.row(
                "seeded" if seeded else "TRL (RNG)",
                seed,
                r["reward_start"],
                f"**{r['reward_end']}**",
                f"{r['eval_reward_start']} -> **{r['eval_reward_end']}**",
                r["step_s_median"],
                r["generation_s_median"],
                f"{r['generation_share']:.0%}",
                f"{r['wall_s'] / 60:.1f} min",
                machine,
                date,
            )
        )
    med = cost["median_s"]
    print(
        f"\nGeneration of 24 tokens x 8 rows, median of 5: TRL's sampling {med['trl']:.2f} s, seeded "
        f"{med['seeded']:.2f} s ({cost['ratio']}x)."
    )


if __name__ == "__main__":
    main()
