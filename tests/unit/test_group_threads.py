"""`move_group_threads`: the threads of gloo process groups leave the engine's core, the caller's thread stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, os, sys
import torch.distributed as dist
from speed_async.sampler.engine import move_group_threads
engine, helper = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {engine})  # as a sampler's engine thread, before its groups start their threads
dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=0, world_size=1)
group = dist.new_group([0], backend="gloo")  # a second group, as vLLM makes several
for g in (None, group):  # a collective on each: every thread its transport needs is up
    dist.barrier(group=g)
def where():
    cpus = {}
    for tid in os.listdir("/proc/self/task"):
        name = open(f"/proc/self/task/{tid}/comm").read().strip()
        cpus.setdefault(name, set()).update(os.sched_getaffinity(int(tid)))
    return {k: sorted(v) for k, v in cpus.items()}
unmoved = move_group_threads(set())  # no helper cores: nothing moves
before = where()
moved = move_group_threads({helper})
main = sorted(os.sched_getaffinity(0))
print(json.dumps({"unmoved": unmoved, "before": before, "moved": moved, "where": where(), "main": main}))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread affinity through /proc is Linux only")
def test_gloo_threads_move_to_the_helper_cores_only_and_the_callers_thread_stays(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores: one for the engine, one for the group threads")
    engine, helper = cores[-1], cores[0]
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(engine), str(helper), str(tmp_path / "store")],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["unmoved"] == 0, found  # without helper cores, the threads stay on the engine's core
    assert all(cpus == [engine] for name, cpus in found["before"].items() if "gloo" in name), found
    gloo = {name: cpus for name, cpus in found["where"].items() if "gloo" in name}
    assert found["moved"] >= 1 and gloo, found
    assert all(cpus == [helper] for cpus in gloo.values()), found
    assert found["main"] == [engine], found  # the caller's thread stays
