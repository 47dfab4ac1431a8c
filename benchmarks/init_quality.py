"""Fine-tune quality per init at its own best lr: pissa, loftq and iterated olora beside olora and lora.

The same settings as benchmarks/lr_sweep.py (the demo model in 4-bit, examples/sft/demo.yaml, 40 steps x 8,
alpha = r, token-weighted held-out loss on 64 rows), so its olora and lora runs
(benchmarks/results/lr/seeds.json) are the other two columns. Phases, each resumable:

    python benchmarks/init_quality.py grid     # chatterbot, r 16, seed 0: each new init over its lrs
    python benchmarks/init_quality.py seeds    # each new init at its best lr, seeds 0-2
    python benchmarks/init_quality.py r64      # chatterbot, r 64, seed 0: every init at its r 16 best lr
    python benchmarks/init_quality.py report   # steps 0 / 20 / 40, learn, forget, the KL-vs-final-loss plot

The plot's x axis is each init's initial logits KL from benchmarks/results/init_fidelity-r16.json
(``python benchmarks/init_fidelity.py --json ...``): an init's model at step 0 does not depend on the seed.
Runs go to runs/inits/, JSON and plots to benchmarks/results/inits/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from lr_sweep import DATASETS, _base, _forget, _mean_spread, config, link_seed0  # noqa: E402

from qolora._io import save_figure_atomic, write_json_atomic  # noqa: E402
from qolora.training.sweep import sweep  # noqa: E402

RUNS, RESULTS = Path("runs/inits"), Path("benchmarks/results/inits")
OLD = Path("benchmarks/results/lr/seeds.json")  # olora and lora at their best lrs, same settings
FIDELITY = Path("benchmarks/results/init_fidelity-r16.json")
FIDELITY64 = Path("benchmarks/results/init_fidelity-r64.json")
NEW = {  # init label -> its lr grid (around the AUTO_LR entry it took provisionally)
    "pissa": [1e-4, 3e-4],
    "loftq-t4": [1e-3, 3e-3],
    "olora-t4": [3e-4],
}
FIDELITY_LABEL = {
    "lora": "plain QLoRA (4-bit, no adapter)",
    "olora": "QOLoRA olora (default)",
    "olora-t4": "QOLoRA olora, T = 4",
    "pissa": "QOLoRA pissa (exact SVD)",
    "loftq-t4": "QOLoRA loftq, T = 4",
}


def _inits(args: argparse.Namespace) -> list[str]:
    return [i for i in args.inits.split(",") if i]


def grid(args: argparse.Namespace) -> None:
    out = RUNS / "chatterbot-grid-r16"
    inits = _inits(args)
    s = sweep(
        config("chatterbot", args.steps, args.eval_rows),
        {f"{i}-r16": NEW[i] for i in inits},
        inits,
        [16],
        [0],
        args.steps,
        out,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    for ext in ("json", "png"):
        shutil.copy(out / f"sweep.{ext}", RESULTS / f"chatterbot-sweep-r16.{ext}")
    print(json.dumps(s["best"], indent=1))


def seeds(args: argparse.Namespace) -> None:
    best = {k: [b["lr"]] for k, b in json.loads((RESULTS / "chatterbot-sweep-r16.json").read_text())["best"].items()}
    best = {k: v for k, v in best.items() if k.rsplit("-r", 1)[0] in _inits(args)}
    for ds in args.datasets.split(","):
        out = RUNS / f"{ds}-seeds"
        out.mkdir(parents=True, exist_ok=True)
        if ds == "chatterbot" and (RUNS / "chatterbot-grid-r16").is_dir():  # seed 0 at the best lr is in the grid
            link_seed0(best, lambda r: RUNS / f"chatterbot-grid-r{r}", out)
        sweep(config(ds, args.steps, args.eval_rows), best, list(_inits(args)), [16], [0, 1, 2], args.steps, out)


def _best16() -> dict[str, float]:
    """Each init's best lr at r 16: lora and olora from the lr sweep's seeds, the others from this grid."""
    old = {m["init"]: m["lr"] for m in json.loads(OLD.read_text())["chatterbot"]["runs"].values() if m["r"] == 16}
    new = json.loads((RESULTS / "chatterbot-sweep-r16.json").read_text())["best"]
    return {**old, **{k.rsplit("-r", 1)[0]: b["lr"] for k, b in new.items()}}


def r64(args: argparse.Namespace) -> None:
    """Every init at r 64 (alpha = r, so the same LoRA scale), seed 0, at its r 16 best lr."""
    best = {i: lr for i, lr in _best16().items() if i in ("lora", "olora", *_inits(args))}
    out = RUNS / "chatterbot-r64"
    s = sweep(
        config("chatterbot", args.steps, args.eval_rows),
        {f"{i}-r64": [lr] for i, lr in best.items()},
        list(best),
        [64],
        [0],
        args.steps,
        out,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "sweep.json", RESULTS / "chatterbot-r64.json")
    kl = json.loads(FIDELITY64.read_text())["results"] if FIDELITY64.is_file() else {}
    print("| init | r | lr | held-out loss at step 0 / 20 / 40 | initial KL | command | machine | date |")
    print("|---|---|---|---|---|---|---|---|")
    for i in best:
        m = next(m for m in s["runs"].values() if m["init"] == i)
        k = (kl.get(FIDELITY_LABEL[i]) or {}).get("kl")
        steps = " / ".join(f"{v:.3f}" if v is not None else "n/a" for v in (_at(m, x) for x in (0, 20, args.steps)))
        print(
            f"| {i} | 64 | {m['lr']:g} | {steps} | {'n/a' if k is None else f'{k:.3f}'} "
            f"| `{_common.command()}` | {_common.machine()} | {_common.today()} |"
        )


def _at(m: dict[str, Any], step: int) -> float | None:
    return next((e["eval_loss"] for e in m.get("eval", []) if e["step"] == step), None)


def report(args: argparse.Namespace) -> None:
    old = json.loads(OLD.read_text())
    fid = json.loads(FIDELITY.read_text())["results"] if FIDELITY.is_file() else {}
    rows, out = [], {}
    for ds in args.datasets.split(","):
        path = RUNS / f"{ds}-seeds" / "sweep.json"
        if not path.is_file():
            continue
        runs = json.loads(path.read_text())["runs"]
        other = DATASETS[next(n for n in DATASETS if n != ds)][1]
        base = _base(ds, RUNS / f"{ds}-seeds" / next(iter(runs)) / "adapter", args.eval_rows)
        for name, m in runs.items():
            if m.get("final_eval_loss") is not None:
                m["learn"] = base["target"] - m["final_eval_loss"]
                m["forget"] = _forget(RUNS / f"{ds}-seeds" / name / "adapter", other, args.eval_rows) - base["source"]
        merged = {**{k: v for k, v in old[ds]["runs"].items() if v["r"] == 16}, **runs}
        out[ds] = {"base": base, "runs": merged}
        for init in ("lora", "olora", *NEW):
            ms = sorted((m for m in merged.values() if m["init"] == init), key=lambda m: m["seed"])
            if not ms:
                continue
            kl = (fid.get(FIDELITY_LABEL[init]) or {}).get("kl")
            rows.append(
                _common.row(
                    f"{ds}, {init}, r=16, {len(ms)} seeds",
                    f"{ms[0]['lr']:g}",
                    " / ".join(_mean_spread([_at(m, s) for m in ms]) for s in (0, 20, args.steps)),
                    _mean_spread([m.get("learn") for m in ms]),
                    _mean_spread([m.get("forget") for m in ms]),
                    "n/a" if kl is None else f"{kl:.3f}",
                    f"`{_common.command()}`",
                    _common.machine(),
                    _common.today(),
                )
            )
        plot_kl(ds, merged, fid, RESULTS / f"{ds}-kl-vs-final.png")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "seeds.json", out)
    print(
        "| dataset, init, rank, seeds | lr | held-out loss at step 0 / 20 / 40 | learn | forget | initial KL "
        "| command | machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def plot_kl(ds: str, runs: dict[str, Any], fid: dict[str, Any], path: Path) -> None:
    """Initial logits KL (x) against the final held-out loss (y): one point per init and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, init in enumerate(("lora", "olora", *NEW)):
        kl = (fid.get(FIDELITY_LABEL[init]) or {}).get("kl")
        ys = [m["final_eval_loss"] for m in runs.values() if m["init"] == init and m.get("final_eval_loss")]
        if kl is None or not ys:
            continue
        ax.scatter(
            [kl] * len(ys), ys, color=f"C{j}", label=f"{init} ({len(ys)} seeds, mean {statistics.fmean(ys):.3f})"
        )
    ax.set(
        title=f"{ds}, r=16, each init at its best lr: does a smaller initial error buy a lower final loss?",
        xlabel="initial logits KL against the fp32 model (per token)",
        ylabel="final held-out loss (token-weighted)",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure_atomic(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["grid", "seeds", "r64", "report"])
    ap.add_argument("--inits", default=",".join(NEW))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--datasets", default="chatterbot")
    args = ap.parse_args()
    {"grid": grid, "seeds": seeds, "r64": r64, "report": report}[args.phase](args)


if __name__ == "__main__":
    main()
