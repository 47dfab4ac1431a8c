"""Shared helpers for the benchmark scripts: machine description, medians, table rows."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {cpu}, {dev}, torch {torch.__version__}"


def today() -> str:
    return _dt.date.today().isoformat()


def command() -> str:
    return "python " + " ".join(sys.argv)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
