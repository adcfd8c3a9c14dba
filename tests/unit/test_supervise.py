"""The single-machine launcher's supervision, with small stand-in processes for the roles (no torch, no vLLM).

A failed sampler is reported (role, exit code or signal) and restarted under the same role up to
cluster.max_sampler_restarts times, pids.json following each restart; one failure more asks the learner to
checkpoint and stop (run_dir/stop_request) and the run ends with status 1. A sampler that found the learner
unresponsive (status 3) stops the run at once. Stopping also ends stopped (SIGSTOP) processes. A failed role is
reported with its own error lines (a logged ERROR, the exception of its traceback; torchrun's ChildFailedError
banner stays in the log) and its log's path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.train import STOP_FILE, Child, _start, stop_children, supervise, write_pids

pytestmark = pytest.mark.timeout(120)

# The stand-in learner finishes when told to stop (the real one writes a checkpoint first) or after 60 s.
LEARNER = f"""
import pathlib, sys, time
stop = pathlib.Path({{run_dir!r}}) / {STOP_FILE!r}
for _ in range(600):
    if stop.exists():
        print("learner ERROR: stopped on request:", stop.read_text().strip(), flush=True)
        sys.exit(1)
    time.sleep(0.1)
"""


def _children(run_dir: Path, sampler_code: str) -> list[Child]:
    learner = [sys.executable, "-c", LEARNER.format(run_dir=str(run_dir))]
    sampler = [sys.executable, "-c", sampler_code]
    children = [_start("learner", learner, {}, run_dir), _start("sampler[0]", sampler, {}, run_dir)]
    write_pids(run_dir, children)
    return children


def test_a_failing_sampler_is_restarted_then_the_run_stops_with_a_checkpoint_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    children = _children(tmp_path, "import time, sys; time.sleep(0.3); sys.exit(7)")
    first = children[1].proc.pid
    status = supervise(children, poll_s=0.05, run_dir=tmp_path, max_restarts=2, stop_wait_s=30)
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("sampler[0] (pid") == 3 and "exited with code 7" in err
    assert "(restart 1 of cluster.max_sampler_restarts = 2)" in err
    assert "(restart 2 of cluster.max_sampler_restarts = 2)" in err
    assert "sampler[0] failed 3 times (cluster.max_sampler_restarts = 2)" in err
    assert (tmp_path / STOP_FILE).read_text().startswith("sampler[0] failed 3 times")
    assert "; its error:\n    learner ERROR: stopped on request: sampler[0] failed 3 times" in err
    assert f"  log: {tmp_path / 'logs' / 'learner.log'}" in err
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert pids["sampler[0]"] == children[1].proc.pid != first, "pids.json names the newest process"
    assert children[1].restarts == 2


def test_a_killed_sampler_is_reported_with_its_signal_and_restarted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first sampler process kills itself; the restarted one marks its start and runs until stopped; the
    # stand-in learner finishes once the restarted sampler is up.
    first, second = tmp_path / "first", tmp_path / "second"
    sampler = (
        "import os, pathlib, signal, time\n"
        f"first, second = pathlib.Path({str(first)!r}), pathlib.Path({str(second)!r})\n"
        "if not first.exists():\n    first.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "second.touch(); time.sleep(2)\n"  # then ends on its own, as one told to stop does
    )
    learner = f"import pathlib, time\nwhile not pathlib.Path({str(second)!r}).exists(): time.sleep(0.05)\n"
    children = [
        _start("learner", [sys.executable, "-c", learner], {}, tmp_path),
        _start("sampler[0]", [sys.executable, "-c", sampler], {}, tmp_path),
    ]
    status = supervise(children, poll_s=0.05, run_dir=tmp_path, max_restarts=1, stop_wait_s=30)
    err = capsys.readouterr().err
    assert status == 0, err
    assert "sampler[0] (pid" in err and "was killed by SIGKILL (exit code -9)" in err
    assert "(restart 1 of cluster.max_sampler_restarts = 1)" in err
    assert all(c.proc.poll() is not None for c in children), "every process is stopped when supervise returns"


def test_a_sampler_that_finds_the_learner_unresponsive_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    children = _children(tmp_path, "import sys; print('sampler ERROR: the learner is unresponsive'); sys.exit(3)")
    start = time.monotonic()
    status = supervise(children, poll_s=0.05, run_dir=tmp_path, max_restarts=5, stop_wait_s=30)
    err = capsys.readouterr().err
    assert status == 1 and time.monotonic() - start < 25
    assert "found the learner unresponsive" in err and "restarted" not in err
    assert children[0].proc.poll() is not None, "the learner was stopped"


def test_after_the_learner_finishes_samplers_may_end_their_call_before_any_signal(tmp_path: Path) -> None:
    # The sampler (told to stop by the learner) needs 1.5 s to finish its call and write its stats; SIGTERM
    # would kill it before (Python's default action), so the file shows it was not signalled.
    stats = tmp_path / "sampler-0.json"
    sampler = f"import pathlib, time; time.sleep(2.0); pathlib.Path({str(stats)!r}).write_text('{{}}')"
    learner = _start("learner", [sys.executable, "-c", "import time; time.sleep(0.5)"], {}, tmp_path)
    children = [learner, _start("sampler[0]", [sys.executable, "-c", sampler], {}, tmp_path)]
    assert supervise(children, poll_s=0.05, run_dir=tmp_path) == 0
    assert stats.exists() and children[1].proc.returncode == 0


def test_stopping_ends_a_stopped_process_and_a_worker_in_its_own_group(tmp_path: Path) -> None:
    child = _start("sampler[0]", [sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path)
    # Like a torchrun worker: a process in a session of its own that ignores SIGTERM, and is stopped.
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    worker = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(0.5)
    os.killpg(child.proc.pid, signal.SIGSTOP)
    os.killpg(worker.pid, signal.SIGSTOP)
    start = time.monotonic()
    stop_children([child], grace_s=3, others=[worker.pid])
    assert child.proc.poll() == -signal.SIGTERM
    assert worker.wait(timeout=5) == -signal.SIGKILL and time.monotonic() - start < 10


def test_pids_file_is_replaced_atomically(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    write_pids(tmp_path, [Child("learner", proc, tmp_path / "x.log")])
    assert json.loads((tmp_path / "pids.json").read_text()) == {"learner": proc.pid}
    assert not (tmp_path / "pids.json.tmp").exists()


# What a learner under torchrun leaves in its log when its data is bad: its own traceback, then torchrun's.
TORCHRUN_FAILURE = """
2026-12-03 12:41:38,652 learner[0] speed_async.learner INFO: loading data
Traceback (most recent call last):
  File "launcher/roles.py", line 5, in <module>
    raise DataError("x")
speed_async.data.sources.DataError: data.jsonl, row 3, field 'prompt': prompt has 200 tokens,
over max_prompt_length 128
E1203 12:41:38.691000 4821 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1032, in <module>
    main()
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
launcher.roles FAILED
------------------------------------------------------------
Root Cause (first observed failure):
  exitcode  : 1 (pid: 4827)
============================================================
"""


def test_a_failed_learner_is_reported_with_its_own_error_not_torchruns_banner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "logs" / "learner.log"
    log.parent.mkdir()
    log.write_text("an earlier run's lines\nTraceback (most recent call last):\nOldError: from before\n")
    script = f"import sys; sys.stderr.write({TORCHRUN_FAILURE!r}); sys.exit(1)"
    children = [_start("learner", [sys.executable, "-c", script], {}, tmp_path)]
    children.append(_start("sampler[0]", [sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path))
    assert supervise(children, poll_s=0.05, run_dir=tmp_path) == 1
    err = capsys.readouterr().err
    assert (
        f"speed-async: learner (pid {children[0].proc.pid}) exited with code 1; its error:\n"
        "    speed_async.data.sources.DataError: data.jsonl, row 3, field 'prompt': prompt has 200 tokens,\n"
        f"    over max_prompt_length 128\n  log: {log}"
    ) in err
    assert "ChildFailedError" not in err and "OldError" not in err, "only this process's own error"
    assert "ChildFailedError" in log.read_text(), "torchrun's banner stays in the log"
    assert children[1].proc.poll() is not None, "the samplers are stopped"


def test_a_killed_role_without_an_error_is_reported_with_its_last_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = "import os, signal; print('generating', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    children = [_start("learner", [sys.executable, "-c", code], {}, tmp_path)]
    assert supervise(children, poll_s=0.05, run_dir=tmp_path) == 1
    err = capsys.readouterr().err
    assert "was killed by SIGKILL (exit code -9); no error in its log; its last lines:\n    generating\n" in err
