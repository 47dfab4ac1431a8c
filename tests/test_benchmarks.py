"""The benchmark scripts' code paths run (tiny shapes, CPU); the GPU checks are in test_gpu.py."""

from __future__ import annotations

import subprocess
import sys


def test_gpu_7b_script_smoke_on_cpu() -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_7b.py", "--shapes", "tiny", "--device", "cpu", "--steps", "2", "--seq", "64"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = out.stdout.strip().splitlines()[-1]
    assert row.startswith("| tiny 4-bit, r=16, seq 64") and "tok/s" in row
