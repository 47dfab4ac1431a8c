"""OLoRA against LoRA, each at its own best learning rate (issue: the seed claims re-measured fairly).

Three phases, each resumable (finished runs are reused), all on the demo model in 4-bit:

    python benchmarks/lr_sweep.py grid     # qolora sweep on chatterbot per rank: each init over its lrs, seed 0
    python benchmarks/lr_sweep.py seeds    # each init at its best lr, seeds 0-2, on chatterbot and pydoc
    python benchmarks/lr_sweep.py balance  # OLoRA with adapter.olora_balance over the same lrs, against plain OLoRA
    python benchmarks/lr_sweep.py report   # forget evals, mean ± spread, plots, BENCHMARKS.md rows

Needs `qolora prepare-demo --out demo`. Runs go to runs/lr/, plots and JSON to benchmarks/results/lr/.
Losses are token-weighted held-out cross-entropy on 64 eval rows (QoloraTrainer's eval loss).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from qolora._io import save_figure_atomic, write_json_atomic  # noqa: E402
from qolora.config import load_config  # noqa: E402
from qolora.training.compare import ema  # noqa: E402
from qolora.training.evaluate import evaluate  # noqa: E402
from qolora.training.sweep import run_name, sweep  # noqa: E402

DATASETS = {
    "chatterbot": ("demo/data/train.jsonl", "demo/data/eval.jsonl"),
    "pydoc": ("demo/data/pydoc_train.jsonl", "demo/data/pydoc_eval.jsonl"),
}
RUNS, RESULTS = Path("runs/lr"), Path("benchmarks/results/lr")
INITS = ["olora", "lora"]


def config(ds: str, steps: int, eval_rows: int, *extra: str) -> Any:
    train, ev = DATASETS[ds]
    return load_config(
        "examples/sft/demo.yaml",
        [
            *extra,
            f"data.train={train}",
            f"data.eval={ev}",
            f"data.max_eval_rows={eval_rows}",
            f"train.max_steps={steps}",
            "train.eval_steps=20",
            "train.save_steps=20",
        ],
    )


def grid(args: argparse.Namespace) -> dict[str, Any]:
    """One sweep per rank (its own dir and JSON), each init over its own lrs."""
    lrs = {"olora": [float(x) for x in args.olora_lrs.split(",")], "lora": [float(x) for x in args.lora_lrs.split(",")]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in args.ranks:
        out = RUNS / f"chatterbot-grid-r{r}"
        s = sweep(
            config("chatterbot", args.steps, args.eval_rows),
            {f"{i}-r{r}": lrs[i] for i in INITS},
            INITS,
            [r],
            [0],
            args.steps,
            out,
        )
        for ext in ("json", "png"):
            shutil.copy(out / f"sweep.{ext}", RESULTS / f"chatterbot-sweep-r{r}.{ext}")
    return s


def balance(args: argparse.Namespace) -> None:
    """Attempt at a less lr-sensitive OLoRA: balanced factors over plain OLoRA's lrs, seed 0, against the grid.

    Sensitivity is the spread of final held-out loss over the lrs (max − min): lower wins, provided the
    best loss is no worse.
    """
    lrs = [float(x) for x in args.olora_lrs.split(",")]
    rows = []
    for r in args.ranks:
        out = RUNS / f"chatterbot-balance-r{r}"
        cfg = config("chatterbot", args.steps, args.eval_rows, "adapter.olora_balance=true")
        bal = sweep(cfg, {f"olora-r{r}": lrs}, ["olora"], [r], [0], args.steps, out)
        plain = json.loads((RESULTS / f"chatterbot-sweep-r{r}.json").read_text())
        res: dict[str, Any] = {"lrs": lrs, "rank": r}
        for label, s in (("plain", plain), ("balanced", bal)):
            finals = {
                m["lr"]: m["final_eval_loss"]
                for m in s["runs"].values()
                if m["init"] == "olora" and m["r"] == r and m["lr"] in lrs and m.get("final_eval_loss") is not None
            }
            res[label] = {"final_eval_loss": {f"{k:g}": v for k, v in sorted(finals.items())}}
        common = sorted(set(res["plain"]["final_eval_loss"]) & set(res["balanced"]["final_eval_loss"]), key=float)
        res["common_lrs"] = common  # spread and best over the lrs both were run at
        for label in ("plain", "balanced"):
            v = [res[label]["final_eval_loss"][k] for k in common]
            if v:
                res[label]["spread"], res[label]["best"] = max(v) - min(v), min(v)
            res[label]["best_any"] = min(res[label]["final_eval_loss"].values(), default=None)
        write_json_atomic(RESULTS / f"chatterbot-balance-r{r}.json", res)
        plot_balance(res, RESULTS / f"chatterbot-balance-r{r}.png")
        p, b = res["plain"], res["balanced"]
        nan = float("nan")
        pf, bf = p["final_eval_loss"], b["final_eval_loss"]
        cells = " / ".join(f"{pf.get(f'{x:g}', nan):.3f} → {bf.get(f'{x:g}', nan):.3f}" for x in lrs)
        rows.append(
            _common.row(
                f"chatterbot, r={r}, {args.steps} steps x 8, seed 0",
                ", ".join(f"{x:g}" for x in lrs),
                cells,
                f"{p.get('spread', nan):.3f} → {b.get('spread', nan):.3f} (over {', '.join(res['common_lrs'])})",
                f"{p.get('best_any') or nan:.3f} → {b.get('best_any') or nan:.3f}",
                f"`{_common.command()}`",
                _common.machine(),
                _common.today(),
            )
        )
    print(
        "| run | lrs | final held-out loss per lr (plain → balanced) | spread over lrs | best | command | machine "
        "| date |"
    )
    print("\n".join(rows))


def plot_balance(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in ("plain", "balanced"):
        pts = sorted((float(k), v) for k, v in res[label]["final_eval_loss"].items())
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"OLoRA {label}")
    ax.set_xscale("log")
    ax.set(
        title=f"chatterbot r={res['rank']}, seed 0: OLoRA's factors as QR gives them vs balanced",
        xlabel="lr",
        ylabel="final held-out loss (token-weighted)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure_atomic(fig, path)


def best_lrs(ranks: list[int]) -> dict[str, list[float]]:
    best = {}
    for r in ranks:
        best.update(
            {k: [b["lr"]] for k, b in json.loads((RESULTS / f"chatterbot-sweep-r{r}.json").read_text())["best"].items()}
        )
    return best


def link_seed0(best: dict[str, list[float]], grid_dir: Any, out: Path) -> None:
    """Link each "<init>-r<r>" run at its best lr and seed 0 from its grid dir (``grid_dir(r)``) into ``out``."""
    for key, (lr,) in best.items():
        init, r = key.rsplit("-r", 1)
        name = run_name(init, int(r), lr, 0)
        if not (out / name).exists():
            os.symlink((grid_dir(r) / name).resolve(), out / name)


def seeds(args: argparse.Namespace) -> None:
    best = best_lrs(args.ranks)
    for ds in args.datasets.split(","):
        out = RUNS / f"{ds}-seeds"
        out.mkdir(parents=True, exist_ok=True)
        if ds == "chatterbot":  # seed 0 at the best lr is already in the grid
            link_seed0(best, lambda r: RUNS / f"chatterbot-grid-r{r}", out)
        sweep(config(ds, args.steps, args.eval_rows), best, INITS, args.ranks, [0, 1, 2], args.steps, out)


def _forget(adapter: Path, source: str, rows: int) -> float:
    path = adapter.parent / "source_loss.json"
    if not path.is_file():
        write_json_atomic(path, evaluate(adapter, source, max_rows=rows, models=("tuned",)))
    return json.loads(path.read_text())["tuned_target"]["loss"]


def _base(ds: str, adapter: Path, rows: int) -> dict[str, float]:
    path = RESULTS / f"{ds}-base.json"
    if not path.is_file():
        other = DATASETS[next(n for n in DATASETS if n != ds)][1]
        r = evaluate(adapter, DATASETS[ds][1], other, max_rows=rows, models=("base",))
        write_json_atomic(path, {"target": r["base_target"]["loss"], "source": r["base_source"]["loss"]})
    return json.loads(path.read_text())


def _mean_spread(xs: list[float | None]) -> str:
    if any(x is None for x in xs):
        return f"{sum(x is not None for x in xs)}/{len(xs)} reached"
    m = statistics.fmean(xs)
    return f"{m:.3f} ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else f"{m:.3f}"


def report(args: argparse.Namespace) -> None:
    rows, out = [], {}
    for ds in args.datasets.split(","):
        path = RUNS / f"{ds}-seeds" / "sweep.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        other = DATASETS[next(n for n in DATASETS if n != ds)][1]
        runs = s["runs"]
        base = _base(ds, RUNS / f"{ds}-seeds" / next(iter(runs)) / "adapter", args.eval_rows)
        for name, m in runs.items():
            m["learn"] = base["target"] - m["final_eval_loss"]
            m["forget"] = _forget(RUNS / f"{ds}-seeds" / name / "adapter", other, args.eval_rows) - base["source"]
            m["train_ema"] = ema([h["loss"] for h in m["history"]])
        out[ds] = {"base": base, "runs": runs, "best_lr": s["grid"]["lrs"]}
        for r in sorted({m["r"] for m in runs.values()}):
            per = {
                i: sorted((m for m in runs.values() if m["init"] == i and m["r"] == r), key=lambda m: m["seed"])
                for i in INITS
            }
            if len(per["olora"]) != len(per["lora"]) or not per["lora"]:
                continue
            steps = []  # OLoRA's steps to LoRA's final train loss (EMA 0.8), same seed
            for o, lo in zip(per["olora"], per["lora"]):
                target = lo["train_ema"][-1]
                steps.append(next((h["step"] for h, v in zip(o["history"], o["train_ema"]) if v <= target), None))
            cells = {
                i: {k: _mean_spread([m[k] for m in per[i]]) for k in ("final_eval_loss", "learn", "forget")}
                for i in INITS
            }
            lr = {i: per[i][0]["lr"] for i in INITS}
            n = len(per["lora"])
            rows.append(
                _common.row(
                    f"{ds}, r={r}, {args.steps} steps x 8, {n} seeds",
                    f"{lr['olora']:g} / {lr['lora']:g}",
                    f"{_mean_spread(steps)} / {args.steps}",
                    f"{cells['olora']['final_eval_loss']} / {cells['lora']['final_eval_loss']}",
                    f"{cells['olora']['learn']} / {cells['lora']['learn']}",
                    f"{cells['olora']['forget']} / {cells['lora']['forget']}",
                    f"`{_common.command()}`",
                    _common.machine(),
                    _common.today(),
                )
            )
        plot_seeds(ds, runs, RESULTS / f"{ds}-seeds.png")
    grid_runs: dict[str, Any] = {}  # learn and forget along the lr axis, seed 0: forget at matched learn
    for r in args.ranks:
        gdir = RUNS / f"chatterbot-grid-r{r}"
        if not (gdir / "sweep.json").is_file():
            continue
        g = json.loads((gdir / "sweep.json").read_text())
        base = _base("chatterbot", gdir / next(iter(g["runs"])) / "adapter", args.eval_rows)
        for name, m in g["runs"].items():
            if m["final_eval_loss"] is not None:
                m["learn"] = base["target"] - m["final_eval_loss"]
                m["forget"] = _forget(gdir / name / "adapter", DATASETS["pydoc"][1], args.eval_rows) - base["source"]
            grid_runs[name] = m
    if grid_runs:
        out["chatterbot-grid"] = grid_runs
        plot_frontier(grid_runs, RESULTS / "chatterbot-learn-forget.png")
    write_json_atomic(RESULTS / "seeds.json", out)
    print(
        "| dataset, rank, seeds | lr (OLoRA / LoRA) | OLoRA's steps to LoRA's final train loss / steps "
        "| final held-out loss (OLoRA / LoRA) | learn | forget | command | machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def plot_seeds(ds: str, runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({m["r"] for m in runs.values()})
    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4.5), squeeze=False)
    for ax, r in zip(axes[0], ranks):
        for init, color in zip(INITS, ("C0", "C1")):
            ms = [m for m in runs.values() if m["init"] == init and m["r"] == r]
            for j, m in enumerate(ms):
                ax.plot(
                    [h["step"] for h in m["history"]],
                    m["train_ema"],
                    color=color,
                    alpha=0.6,
                    label=f"{init} lr {m['lr']:g} ({len(ms)} seeds)" if j == 0 else None,
                )
        ax.set(title=f"{ds} r={r}: train loss (EMA 0.8), each seed", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure_atomic(fig, path)


def plot_frontier(runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key in sorted({f"{m['init']}-r{m['r']}" for m in runs.values()}):
        ms = sorted(
            (m for m in runs.values() if f"{m['init']}-r{m['r']}" == key and "learn" in m), key=lambda m: m["lr"]
        )
        ax.plot([m["learn"] for m in ms], [m["forget"] for m in ms], "o-", label=key)
        for m in ms:
            ax.annotate(f"{m['lr']:g}", (m["learn"], m["forget"]), fontsize=7)
    ax.set(
        title="chatterbot sweep, seed 0: forget (pydoc) against learn, one point per lr",
        xlabel="learn (base − tuned held-out loss)",
        ylabel="forget (tuned − base pydoc loss)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure_atomic(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["grid", "seeds", "balance", "report"])
    ap.add_argument("--olora-lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--lora-lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--ranks", type=lambda t: [int(x) for x in t.split(",")], default=[16, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--datasets", default="chatterbot,pydoc")
    args = ap.parse_args()
    {"grid": grid, "seeds": seeds, "balance": balance, "report": report}[args.phase](args)


if __name__ == "__main__":
    main()
