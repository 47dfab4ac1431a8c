"""scripts/gpu_check.sh --rehearse: every part of the GPU proof runs on the CPU and writes its keys."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402

GPU_TESTS = [
    n.name
    for n in ast.parse((Path(__file__).parent / "test_gpu.py").read_text()).body
    if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--rehearse", str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    return out, proc


def test_the_rehearsal_runs_every_part_and_writes_the_schema(rehearsal) -> None:
    out, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([*(f"{k}.json" for k in (*gpu_check.PARTS, "summary")), "gpu_check.log"])
    assert len(files) <= 8  # what the device tool brings back
    for part in gpu_check.PARTS:
        data = json.loads((out / f"{part}.json").read_text())
        missing = set(gpu_check.COMMON) | set(gpu_check.SCHEMA[part])
        assert not missing - data.keys(), (part, missing - data.keys())
        assert data["status"] == "ok" and data["rehearse"] is True and data["exit_code"] == 0, data
        assert data["device"] == "cpu"
    summary = json.loads((out / "summary.json").read_text())
    assert set(gpu_check.SCHEMA["summary"]) <= summary.keys()
    assert all(v["status"] == "ok" for v in summary["parts"].values())
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows == summary["rows"] and len(rows) == 6  # tests, 2 memory runs, 2 context modes, init


def test_the_rehearsal_ran_every_gpu_test_on_the_cpu(rehearsal) -> None:
    out, _ = rehearsal
    tests = json.loads((out / "tests.json").read_text())
    ran = {name.split("[")[0] for name in tests["results"]}
    assert ran == set(GPU_TESTS), set(GPU_TESTS) ^ ran
    assert tests["failed"] == 0 and tests["skipped"] == 0 and tests["passed"] >= len(GPU_TESTS)
    assert {name.split("[")[0] for name in tests["records"]} == set(GPU_TESTS)  # each recorded what it measured
    assert tests["records"]["test_kernel_self_check_passes_in_bf16"]["errors"]["train out"] > 0


def test_the_rehearsal_measures_each_run_and_mode(rehearsal) -> None:
    out, _ = rehearsal
    mem = json.loads((out / "memory.json").read_text())
    assert set(mem["runs"]) == {"qolora", "peft"}
    for r in mem["runs"].values():
        assert set(gpu_check.RUN_KEYS) <= r.keys() and r["tokens_per_s"] > 0 and r["plan_bytes"] > 0
    ctx = json.loads((out / "context.json").read_text())
    assert set(ctx["modes"]) == {"no_offload", "offload"}
    for m in ctx["modes"].values():
        assert set(gpu_check.MODE_KEYS) <= m.keys()
        assert m["max_seq"] == 384  # the rehearsal's stand-in for the 24 GiB cap, found by the bisection
        assert any(not p["fits"] for p in m["probes"]) and any(p["fits"] for p in m["probes"])
    init = json.loads((out / "init.json").read_text())
    assert init["repeats"] >= 1 and init["ratio"] > 1 and init["sources"] == {"checkpoint": 14}


def test_a_part_killed_by_its_time_box_is_marked_and_keeps_what_it_measured(tmp_path) -> None:
    p = gpu_check.Part(tmp_path, "memory", rehearse=True)
    p.update(runs={"qolora": {"tokens_per_s": 1.0}})  # then the time box's SIGTERM: no final status
    gpu_check.mark(tmp_path, "memory", 124)
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["status"] == "timeout" and "time box" in data["error"] and data["runs"]["qolora"]
    gpu_check.mark(tmp_path, "init", 1)  # a part that died before writing anything
    data = json.loads((tmp_path / "init.json").read_text())
    assert data["status"] == "failed" and set(gpu_check.SCHEMA["init"]) <= data.keys()
