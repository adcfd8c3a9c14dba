"""The threads of this process and the cores each may run on, from Linux /proc."""

from __future__ import annotations

from pathlib import Path

TASKS = Path("/proc/self/task")


def task_cpus(tid: int) -> set[int]:
    """The cores thread `tid` of this process may run on (its Cpus_allowed_list)."""
    status = (TASKS / str(tid) / "status").read_text().splitlines()
    listed = next(line for line in status if line.startswith("Cpus_allowed_list")).split(":")[1].strip()
    cpus: set[int] = set()
    for part in listed.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def threads_named(prefix: str) -> list[int]:
    """Thread ids of this process whose kernel name (comm) starts with `prefix` (threads of C libraries name
    themselves; Python threads before 3.14 do not)."""
    return [int(t.name) for t in TASKS.iterdir() if (t / "comm").read_text().strip().startswith(prefix)]
