"""`auto` for the learner's and the engine's dtype: bfloat16 where the hardware computes it natively, else float32.

Measured on this project's 2-core Sapphire Rapids (AMX) machine (benchmarks/results/cpu-settings_*): the vLLM
engine generates 1.4-1.5x more tokens/s with bfloat16 weights, and the learner's RL step is about 1.8x shorter in
bfloat16 (with eager attention: SDPA's CPU bfloat16 backward is 3-5x slower than its float32 one). A CPU without
AMX emulates bfloat16 matrix products, so there `auto` keeps float32. On CUDA `auto` is bfloat16.
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
