"""One owner per run directory, and state files that are never seen half-written.

```
 run_dir/.lock     an fcntl lock held by the live run's launcher (under torchrun: global rank 0) for its whole
                   life; inside, one JSON line: {"pid", "host", "started", "command"} and, once released
                   cleanly, "released": true
```
- A second `speed-async train` into the directory, or `--resume` of it, finds the lock held and is refused at
  once (`RunDirBusy`, naming the holder's PID and host).
- A lock that nobody holds (its holder died: the kernel drops an fcntl lock with its last open descriptor) is
  taken over, and the takeover says whose it was. A lock file that is not a lock record (corrupt, truncated,
  empty) is an error naming it: never a silent second owner.
- The lock file is never replaced or deleted: a new file under the same name would let a waiter hold a lock on
  the old one while a newcomer locks the new one. Its record is rewritten in place (one `pwrite` of a line,
  then a truncate), and read up to its first newline, so a kill between the two leaves a readable record.

Every JSON state file of a run (resolved_config.json, pids.json, endpoints.json, stats) is written with
`write_json` (temporary file in the same directory, fsync, rename over), so a reader sees the old file or the
new one, never a mix; `read_json` names the file and what to do when one does not parse. No torch here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
READ_RETRY_S = 1.0
"""How long to wait for a new holder to write its record (it locks first, then writes)."""


class RunDirBusy(ValueError):
    """Another live process holds the run directory's lock."""


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically: a temporary file beside it (unique to this process), fsynced, renamed
    over `path`. A reader or a kill at any moment sees the old content or the new, never part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path: str | Path, value: Any, *, indent: int | None = None, sort_keys: bool = False) -> None:
    """`value` as JSON (plus a newline when indented), written atomically (see `write_text`)."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys)
    write_text(path, text + "\n" if indent is not None else text)


def read_json(path: str | Path, what_to_do: str) -> Any:
    """The JSON value in `path`; ValueError naming the file, where it stopped parsing and `what_to_do` when it
    is not JSON (FileNotFoundError and other OSErrors pass through)."""
    path = Path(path)
    text = path.read_text(errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        state = "is empty" if not text.strip() else f"is not valid JSON ({err})"
        raise ValueError(f"{path} {state}: {what_to_do}") from None


def _host() -> str:
    return socket.gethostname()


def _parse_record(path: Path, data: bytes) -> dict[str, Any]:
    """The lock record in `data` (its first line); ValueError naming `path` when it is not one."""
    line = data.split(b"\n", 1)[0].strip()
    fix = (
        "it was not written by speed-async or was damaged. If no process of a run uses this directory, delete "
        f"{path} and retry"
    )
    if not line:
        raise ValueError(f"{path} is empty (no holder recorded): {fix}")
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a lock record ({err}): {fix}") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("pid"), int)
        or not isinstance(record.get("host"), str)
    ):
        raise ValueError(f"{path} is not a lock record (no pid and host in {line[:200]!r}): {fix}")
    return record


def _holder(record: dict[str, Any]) -> str:
    return f"pid {record['pid']} on host {record['host']}" + (
        f", started {record['started']}" if record.get("started") else ""
    )


class RunDirLock:
    """The exclusive lock on `run_dir/.lock` (see the module docstring). `acquire` takes it or raises; the lock
    lasts until `release` or the end of this process (its descriptor is not inherited by child processes)."""

    def __init__(self, run_dir: str | Path, command: str = "train") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.command = command
        self.previous: dict[str, Any] | None = None
        """The record of the holder this lock was taken over from (None: the file was new or released)."""
        self.record: dict[str, Any] = {}
        """What this process wrote into the lock file."""
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> str | None:
        """Take the lock (creating the directory and the file if needed). Returns a line to show when it was
        taken over from a holder that died without releasing it, else None. Raises RunDirBusy when a live
        process holds it, ValueError when the file is not a lock record."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + READ_RETRY_S
        while True:
            created = False
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                self._refuse(deadline)
                time.sleep(0.1)
                continue
            try:
                data = os.pread(fd, 4096, 0)
                if not data and not created and time.monotonic() < deadline:
                    # A newcomer may have created the file and not locked it yet: let it, and look again.
                    raise BlockingIOError
                self.previous = None if created else _parse_record(self.path, data)
            except BlockingIOError:
                os.close(fd)
                time.sleep(0.1)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self.record = {"pid": os.getpid(), "host": _host(), "started": _now(), "command": self.command}
            self._write(self.record)
            return self._takeover_note()

    def _refuse(self, deadline: float) -> None:
        """Raise RunDirBusy naming the live holder (waiting up to READ_RETRY_S for it to write its record)."""
        try:
            record = _parse_record(self.path, self.path.read_bytes())
        except (OSError, ValueError) as err:
            if time.monotonic() < deadline:
                return  # the holder has locked but not written yet: the caller retries
            raise RunDirBusy(
                f"run directory {self.run_dir} is in use by another process (it holds {self.path}, whose "
                f"record cannot be read: {err})"
            ) from None
        raise RunDirBusy(
            f"run directory {self.run_dir} is in use by a live run: {_holder(record)} holds {self.path}. Stop "
            "that run first (or wait for it to end), or use another trainer.run_dir"
        )

    def _takeover_note(self) -> str | None:
        previous = self.previous
        if previous is None or previous.get("released"):
            return None
        return (
            f"took over the lock of {self.run_dir} from {_holder(previous)}, which ended without releasing it "
            "(a killed run)"
        )

    def _write(self, record: dict[str, Any]) -> None:
        assert self._fd is not None
        line = (json.dumps(record) + "\n").encode()
        os.pwrite(self._fd, line, 0)  # the first line is the record: a kill before the truncate leaves it readable
        os.ftruncate(self._fd, len(line))
        os.fsync(self._fd)

    def release(self) -> None:
        """Mark the record released and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self._write({**self.record, "released": True})
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def take_run_dir(
    run_dir: str | Path, command: str, *, previous_exit_wait_s: float = 15.0
) -> tuple[RunDirLock, str | None]:
    """The lock of `run_dir` and the takeover note, if any (see `RunDirLock.acquire`). The processes an earlier
    run left in its pids.json get `previous_exit_wait_s` to die (they die with their launcher); RunDirBusy (a
    ValueError) naming them if one is still alive then, or when a live run holds the lock."""
    lock = RunDirLock(run_dir, command)
    note = lock.acquire()
    deadline = time.monotonic() + previous_exit_wait_s
    try:
        while alive := alive_from(lock.run_dir / "pids.json"):
            if time.monotonic() > deadline:
                listing = ", ".join(f"{role} (pid {pid})" for role, pid in sorted(alive.items()))
                raise RunDirBusy(
                    f"run directory {lock.run_dir}: processes of an earlier run are still alive after "
                    f"{previous_exit_wait_s:.0f} s: {listing}; end them (kill PID) and retry"
                )
            time.sleep(0.2)
    except BaseException:
        lock.release()
        raise
    return lock, note


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, from /proc), or None if it does not exist or this
    is not Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:5] == "btime"
        )
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has ended; only its entry is left
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def alive_from(pids_file: str | Path) -> dict[str, int]:
    """{role: pid} of the processes named in a run's pids.json that are still running: those that exist and
    started before the file was last written (a PID reused since then is another process). Empty when the file
    does not exist; ValueError naming it when it does not parse."""
    path = Path(pids_file)
    try:
        written = path.stat().st_mtime
        pids = read_json(path, "it lists the run's processes; if none of them runs any more, delete it")
    except FileNotFoundError:
        return {}
    if not isinstance(pids, dict):
        raise ValueError(f"{path} is not a {{role: pid}} object: if no process of the run runs any more, delete it")
    alive = {}
    for role, pid in pids.items():
        started = process_start_time(int(pid))
        if started is not None and started <= written + 1.0:  # /proc's start time has clock-tick resolution
            alive[str(role)] = int(pid)
    return alive
