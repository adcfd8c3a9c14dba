"""`enable_cpu_huge_pages`: a sampler's large CPU tensors get transparent huge pages, unless the environment says no."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, os
from speed_async.sampler.engine import enable_cpu_huge_pages
asked = enable_cpu_huge_pages()
import torch
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
kib = sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:"))
print(json.dumps({"asked": asked, "env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kib": kib}))
"""
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _run(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mode() -> str:
    found = re.search(r"\[(\w+)\]", THP_MODE.read_text()) if THP_MODE.exists() else None
    return found.group(1) if found else "unknown"


@pytest.mark.skipif(_mode() not in ("madvise", "always"), reason="the kernel gives no transparent huge pages here")
def test_large_cpu_tensors_get_huge_pages() -> None:
    got = _run(None)
    assert got["asked"] is True and got["env"] == "1"
    # At least one 2-MiB page (here: 62 of the tensor's 64 MiB); without the switch, `madvise` gives none (below).
    assert got["huge_kib"] >= 2048, got


def test_a_user_setting_of_zero_is_kept() -> None:
    got = _run("0")
    assert got["asked"] is False and got["env"] == "0"
    if _mode() == "madvise":  # nothing else asks for huge pages in this process
        assert got["huge_kib"] == 0, got
