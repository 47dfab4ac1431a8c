"""1 process against 2 (torchrun, gloo) at the same global batch, on the CPU: tokens/s and the
init cost (rank 0's init, the other ranks' rebuild from initial_adapter/, the digest check).

The 2-process run holds batch_size per rank and grad_accum 1; the 1-process run grad_accum 2, so
both take the same examples per step. Runs alternate A B A B, each in a fresh launch.
On a 2-core machine the two processes share the cores that one process uses alone: expect no
speed-up; the row says so.

    python benchmarks/distributed_cpu.py [--repeats 2] [--steps 8] [--batch 4] [--max-length 128] [--distributed fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def run(n: int, out: Path, a: argparse.Namespace) -> dict:
    cfg = Path("examples/sft/demo.yaml").resolve()
    over = [
        f"train.output_dir={out}",
        f"train.max_steps={a.steps}",
        f"train.batch_size={a.batch}",
        f"train.grad_accum={2 // n}",
        f"data.max_length={a.max_length}",
        f"data.max_train_rows={a.steps * a.batch * 2}",
        "data.max_eval_rows=8",
        "train.eval_steps=1000000",
        "train.save_steps=1000000",
        "train.logging_steps=1",
        f"train.distributed={a.distributed}",  # one process: none, whatever it says
    ]
    if n == 1:
        cmd = [sys.executable, "-m", "qolora", "train", str(cfg), *over]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        cmd += ["-m", "qolora", "train", str(cfg), *over]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(["rm", "-rf", str(out)], check=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    m = json.loads((out / "metrics.json").read_text())
    return {
        "tokens_per_s": m["tokens_per_s"],
        "init_s": m["init_s"],
        "wall_time_s": m["wall_time_s"],
        "losses": [h["loss"] for h in m["history"]],
        "world_size": m["world_size"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/distributed_cpu[-fsdp].json")
    a = ap.parse_args()
    a.out = a.out or f"benchmarks/results/distributed_cpu{'-fsdp' if a.distributed == 'fsdp' else ''}.json"
    res: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(a.repeats):
        for n in (1, 2):
            res[n].append(run(n, Path(f"/tmp/qolora-dist-bench-{n}"), a))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "init_s")} for n, rs in res.items()}
    same = all(r["losses"] == res[1][0]["losses"] for r in res[1] + res[2])
    maxdiff = max(abs(x - y) for r in res[2] for x, y in zip(r["losses"], res[1][0]["losses"]))
    result = {
        "machine": _common.machine(),
        "args": vars(a),
        "runs": res,
        "median": med,
        "losses_equal": same,
        "max_loss_diff": maxdiff,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(
        f"| {a.distributed}: demo model, {a.steps} steps, global batch {2 * a.batch}, seq <= {a.max_length} | "
        f"{med[1]['tokens_per_s']:.0f} tok/s | {med[2]['tokens_per_s']:.0f} tok/s "
        f"({med[2]['tokens_per_s'] / med[1]['tokens_per_s']:.2f}x) | init {med[1]['init_s']:.2f} s | "
        f"init {med[2]['init_s']:.2f} s ({med[2]['init_s'] / med[1]['init_s']:.2f}x) | losses max diff {maxdiff:.1e} | "
        f"median of {a.repeats}, A B A B, `{_common.command()}`, {_common.machine()} |"
    )


if __name__ == "__main__":
    main()
