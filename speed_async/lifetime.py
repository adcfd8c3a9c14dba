"""Every process of a run dies with the process that started it, whatever signal ends that one (SIGKILL too).

```
 speed-async train (launcher, pid L)
   ├─ torchrun agent        PR_SET_PDEATHSIG = SIGKILL, set before exec (`preexec_die_with_parent`)
   │    └─ learner worker   PDEATHSIG set at start-up (`die_with_parent`; torchrun puts it in a session of its own)
   │         └─ guard       kills the worker's process group once the worker is gone (`guard_process_group`)
   └─ sampler[i]            PDEATHSIG set before exec, again at start-up; leads its own process group
        ├─ guard            as above: takes the reward workers and any vLLM engine process with it
        ├─ reward workers   (spawned into the sampler's group; they also poll their parent, rewards/pool.py)
        └─ vLLM engine core and workers, when vLLM runs them out of process (also in the sampler's group)
```
- The kernel sends a process's parent-death signal when the *thread* that created it exits, and only if the
  signal was set by the child itself; so the launcher starts every role from its main thread, and a process
  checks right after setting it that its parent is still the expected one (it may have died before).
- A process that cannot set the signal for its own children (vLLM's engine processes, anything a library
  starts) is covered by its role's guard: a forked watcher in the role's process group that polls its parent
  (the role process) and, once that has gone, SIGKILLs the whole group by its id (never by name).
- Under a multi-node torchrun every worker does the same against its torchrun agent: a worker whose agent
  dies exits within a second, and its group with it.
Linux only (prctl); elsewhere these are no-ops and only the guards' polling remains.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
LAUNCHER_PID_ENV = "SPEED_ASYNC_LAUNCHER_PID"
"""Set by the launcher in the environment of every process it starts: its own PID."""
EXIT_ORPHANED = 70
"""Exit status of a process that found, at start-up, that the process which started it had already died."""
GUARD_POLL_S = 0.2

_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in a forked child


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) exits. False where unsupported."""
    if _prctl is None:
        return False
    return _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def preexec_die_with_parent() -> Callable[[], None]:
    """A `subprocess.Popen(preexec_fn=...)` that makes the child die (SIGKILL) with the calling process: it
    sets the parent-death signal between fork and exec, then exits at once if the caller already died. Call
    Popen from the main thread: the signal fires when the creating thread exits."""
    parent = os.getpid()
    prctl = _prctl

    def preexec() -> None:  # runs in the forked child: no imports, no allocation beyond the call
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(EXIT_ORPHANED)

    return preexec


def parent_of(pid: int) -> int | None:
    """The parent PID of process `pid` (from /proc), or None when it is gone or this is not Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def die_with_parent(ancestor: int | None = None) -> int:
    """At a process's start-up: SIGKILL this process when its parent exits, and exit now (EXIT_ORPHANED) if
    the parent is already gone: reparented to init, or, when `ancestor` is given (the launcher's PID), neither
    the parent nor the parent's parent is `ancestor`. Returns the parent's PID."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    orphaned = os.getppid() != parent or parent == 1
    if ancestor is not None and not orphaned:
        orphaned = ancestor not in (parent, parent_of(parent))
    if orphaned:
        print(
            f"speed-async: process {os.getpid()} started after its parent had died (parent {os.getppid()}, "
            f"expected {ancestor or parent}); exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_ORPHANED)
    return parent


def launcher_pid() -> int | None:
    """The launcher's PID when this process was started by `speed-async train` (directly or under its
    torchrun), else None."""
    value = os.environ.get(LAUNCHER_PID_ENV, "")
    return int(value) if value.isdigit() else None


def guard_process_group(poll_s: float = GUARD_POLL_S) -> int | None:
    """If this process leads its process group, fork a guard into the group that SIGKILLs the whole group as
    soon as this process has ended (by any means; with a normal exit it takes what is left, e.g. a hung
    engine process). Returns the guard's PID, or None when this process does not lead its group (the guard
    would kill processes that are not this run's). Call it early, before threads and sockets exist."""
    leader = os.getpid()
    if os.getpgrp() != leader:
        return None
    pid = os.fork()
    if pid:
        return pid
    try:  # the guard: nothing but a wait for the leader to go
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while os.getppid() == leader:
            time.sleep(poll_s)
        os.killpg(leader, signal.SIGKILL)
    finally:
        os._exit(0)


def exists(pid: int) -> bool:
    """Whether a process `pid` exists (a zombie included: it has not been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to process group `pgid` (a role's: its leader's PID); nothing if the group is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def die_with_the_run() -> None:
    """The start-up of a role process of `speed-async train` (sampler, torchrun's learner worker) or of a
    multi-node torchrun worker: die with the parent (checked against the launcher when there is one) and guard
    this process's group. A no-op for a process started otherwise (e.g. a test calling a role in-process)."""
    ancestor = launcher_pid()
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if ancestor is None and not under_torchrun:
        return
    die_with_parent(ancestor)
    guard_process_group()
