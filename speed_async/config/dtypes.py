"""`auto` for the learner's and the engine's dtype: bfloat16 where the hardware computes it natively, else float32.

Measured on this project's 2-core Sapphire Rapids (AMX) machine (README, Precision; benchmarks/results/
cpu-settings_cpu-2core_2026-12-05.md): in 40-step training runs the learner's forward + backward took 1.60-1.65 s
per RL step in bfloat16 against 2.24-2.41 s in float32 (with eager attention: SDPA's CPU bfloat16 backward took
8x its float32 time), and the RL step 2.40 / 1.76 s against 3.77 / 2.82 s (hard mix / ladder) with the engine
in bfloat16 as well. On a CPU without AMX `auto` keeps float32: none was measured here, and one without any
bfloat16 instructions (AVX2, plain AVX-512) emulates them. On CUDA `auto` is bfloat16.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

CPU_FLAGS_FILE = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"amx_bf16"})
"""CPU flags under which `auto` picks bfloat16 (Intel AMX: Sapphire Rapids and later)."""


@cache
def cpu_flags(path: Path = CPU_FLAGS_FILE) -> frozenset[str]:
    """The flags of the first CPU in `path` (/proc/cpuinfo); empty where the file is missing or has none."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bfloat16(flags: frozenset[str] | None = None) -> bool:
    """Whether this machine's CPU computes bfloat16 matrix products natively (see `NATIVE_BF16_FLAGS`)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_dtype(name: str, cuda: bool, flags: frozenset[str] | None = None) -> str:
    """`name` (a `model.train_dtype` / `model.engine_dtype` value), with `auto` made concrete: bfloat16 on CUDA
    (`cuda`) or on a CPU with native bfloat16, else float32. Other names pass through unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if cuda or native_bfloat16(flags) else "float32"
