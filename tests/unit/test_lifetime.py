"""Processes die with the process that started them (speed_async.lifetime), with small stand-in processes:
a "launcher" SIGKILLed takes its role and the role's own child (in the role's process group, like a reward
worker or a vLLM engine process) with it; a "torchrun agent" SIGKILLed takes its worker and the worker's child.
Everything is started and ended by PID; nothing here imports torch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed_async.lifetime import EXIT_ORPHANED, LAUNCHER_PID_ENV, parent_of

pytestmark = pytest.mark.timeout(60)

# A role: ties its life to its parent, starts a child of its own (same process group), reports the PIDs.
ROLE = """
import json, os, subprocess, sys, time
from speed_async.lifetime import die_with_the_run
die_with_the_run()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1] + ".tmp", "w").write(json.dumps({"role": os.getpid(), "child": child.pid}))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

# The launcher: starts the role with `speed-async train`'s own start function (session of its own,
# parent-death signal before exec, its PID in the environment).
LAUNCHER = """
import pathlib, sys, time
from launcher.train import _start
_start("sampler[0]", [sys.executable, "-c", sys.argv[2], sys.argv[1]], {}, pathlib.Path(sys.argv[1]).parent)
time.sleep(60)
"""

# A torchrun agent: starts its worker in a session of its own, with no help (the worker helps itself).
AGENT = """
import os, subprocess, sys, time
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
env.pop("SPEED_ASYNC_LAUNCHER_PID", None)
subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]], env=env, start_new_session=True)
time.sleep(60)
"""


def _running(pid: int) -> bool:
    """Whether `pid` runs (an unreaped zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _start(code: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    report = tmp_path / "pids.json"
    env = {k: v for k, v in os.environ.items() if k not in (LAUNCHER_PID_ENV, "TORCHELASTIC_RUN_ID")}
    top = subprocess.Popen([sys.executable, "-c", code, str(report), ROLE], env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while not report.exists():
        assert time.monotonic() < deadline and top.poll() is None, "the role did not start"
        time.sleep(0.05)
    return top, json.loads(report.read_text())


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize("top_code", [LAUNCHER, AGENT], ids=["launcher", "torchrun-agent"])
def test_killing_the_parent_ends_the_role_and_its_group(tmp_path: Path, top_code: str) -> None:
    top, pids = _start(top_code, tmp_path)
    role, child = pids["role"], pids["child"]
    everyone = [role, child]
    try:
        assert parent_of(role) == top.pid and parent_of(child) == role
        assert os.getpgid(child) == os.getpgid(role) == role, "the role leads the group its child is in"
        guards = [int(p) for p in Path(f"/proc/{role}/task/{role}/children").read_text().split() if int(p) != child]
        assert len(guards) == 1 and os.getpgid(guards[0]) == role, "one guard, in the role's group"
        everyone += guards
        killed = time.monotonic()
        top.send_signal(signal.SIGKILL)
        top.wait()
        assert _wait_gone(everyone, 5.0) == [], "every process of the run ends with its parent"
        assert time.monotonic() - killed < 5.0
    finally:
        for pid in everyone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_role_whose_launcher_is_not_its_ancestor_exits_at_once() -> None:
    # As if the launcher had died between starting the role and the role's start-up check.
    code = "from speed_async.lifetime import die_with_parent; die_with_parent(ancestor=999_999_999); print('ran')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == EXIT_ORPHANED and "ran" not in done.stdout
    assert "started after its parent had died" in done.stderr


def test_no_guard_outside_a_run_or_for_a_process_that_does_not_lead_its_group() -> None:
    code = (
        "import os; from speed_async.lifetime import die_with_the_run, guard_process_group\n"
        "die_with_the_run()\n"  # no launcher, no torchrun: a no-op
        "print(guard_process_group(), len(os.listdir(f'/proc/{os.getpid()}/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (LAUNCHER_PID_ENV, "TORCHELASTIC_RUN_ID")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30, check=True)
    assert done.stdout.split()[0] == "None", "a process in the caller's group never guards it"
