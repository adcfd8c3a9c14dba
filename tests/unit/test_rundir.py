"""One owner per run directory (an fcntl lock with its holder's PID and host), atomic state files, and reads
that name the file when it does not parse. The holders are real processes; nothing here imports torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed_async.rundir import (
    LOCK_FILE,
    RunDirBusy,
    RunDirLock,
    alive_from,
    read_json,
    take_run_dir,
    write_json,
)

HOLDER = """
import sys, time
from speed_async.rundir import RunDirLock
lock = RunDirLock(sys.argv[1], "train")
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_holder_is_named_and_a_second_owner_refused_at_once(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(RunDirBusy, match=rf"in use by a live run: pid {holder.pid} on host {socket.gethostname()}"):
            RunDirLock(tmp_path).acquire()
        assert time.monotonic() - start < 1.0, "refused at once"
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over_and_says_so(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunDirLock(tmp_path, "resume")
    note = lock.acquire()
    assert note is not None and f"from pid {holder.pid} on host" in note and "without releasing it" in note
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["command"] == "resume"
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["released"] is True
    again = RunDirLock(tmp_path)
    assert again.acquire() is None, "a released lock is taken without a note"
    again.release()


def test_one_process_cannot_own_a_run_directory_twice(tmp_path: Path) -> None:
    with RunDirLock(tmp_path), pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
        RunDirLock(tmp_path).acquire()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"\.lock is empty \(no holder recorded\)"),
        (b'{"pid": 12', r"\.lock is not a lock record \("),
        (b'{"host": "x"}\n', r"\.lock is not a lock record \(no pid and host"),
        (b"\xff\xfe garbage", r"\.lock is not a lock record"),
    ],
)
def test_a_corrupt_or_truncated_lock_file_is_an_error_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / LOCK_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        RunDirLock(tmp_path).acquire()
    assert f"delete {tmp_path / LOCK_FILE}" in str(err.value)
    assert (tmp_path / LOCK_FILE).read_bytes() == content, "never a silent second owner"


def test_a_record_rewritten_over_a_longer_one_is_read_up_to_its_newline(tmp_path: Path) -> None:
    # A kill between the record's write and the truncate leaves the new line and the old tail: still readable.
    (tmp_path / LOCK_FILE).write_text('{"pid": 1, "host": "h", "released": true}\n{"pid": 2, "host": "a-long-tail"}')
    lock = RunDirLock(tmp_path)
    assert lock.acquire() is None
    lock.release()


def test_a_takeover_waits_for_the_earlier_runs_processes(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_json(tmp_path / "pids.json", {"sampler[0]": sleeper.pid})
        assert alive_from(tmp_path / "pids.json") == {"sampler[0]": sleeper.pid}
        with pytest.raises(RunDirBusy, match=rf"still alive after 1 s: sampler\[0\] \(pid {sleeper.pid}\)"):
            take_run_dir(tmp_path, "resume", previous_exit_wait_s=1.0)
        probe = RunDirLock(tmp_path)
        assert probe.acquire() is None, "the refused taker released the lock"
        probe.release()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert alive_from(tmp_path / "pids.json") == {}, "a reaped process is not alive"
    lock, _ = take_run_dir(tmp_path, "resume", previous_exit_wait_s=0.5)
    lock.release()


def test_state_files_are_replaced_whole_and_bad_ones_named(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    write_json(path, {"work": "tcp://127.0.0.1:1"})
    write_json(path, {"work": "tcp://127.0.0.1:2"}, indent=2)
    assert read_json(path, "x") == {"work": "tcp://127.0.0.1:2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endpoints.json"], "no temporary file left"
    path.write_text('{"work": ')
    with pytest.raises(ValueError, match=r"endpoints\.json is not valid JSON \(.*\): rewrite it"):
        read_json(path, "rewrite it")
    path.write_text("")
    with pytest.raises(ValueError, match=r"endpoints\.json is empty: rewrite it"):
        read_json(path, "rewrite it")
