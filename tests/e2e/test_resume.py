"""Kill -9 the launcher of a real run alone, after its first checkpoint and at a moment that leaves lines to roll
back: every process of the run (torchrun, its worker, the sampler, their guards and reward workers) must be
gone 20 s later. `speed-async train --resume` it (taking over the dead run's lock, its progress bar reading
through the resume's rewrite of metrics.jsonl); a second `--resume` while that one lives is refused at once,
naming its PID. In the resumed run SIGSTOP the only sampler, so that the learner reports it lost, waits
pipeline.rejoin_timeout_s, writes a checkpoint and stops with an error naming it; resume again to the end
(exit 0), and check through the run directory that nothing was lost or repeated.

Effective history = ledger / metrics lines not marked `rolled_back`. In it: exactly BATCH groups trained at
every step 0..N-1, each (epoch, prompt) trained at most once, lag <= k; every dispatched prompt has at most one
fate (trained / rejected / dropped), and one without a fate is still in flight or ready at the final checkpoint
or was dispatched after it; the metrics' versions are 1..N; after the resume no work goes to a sampler that
does not hold the restored weights yet.
"""

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

from speed_async.learner.checkpoint import effective, latest_checkpoint
from speed_async.metrics import read_metrics
from speed_async.orchestrator.ledger import read_ledger
from tests.e2e.harness import REPO, check_accounting, role_env

pytestmark = pytest.mark.e2e

STEPS = 8
BATCH = 4
K = 1
SAMPLER_TIMEOUT_S = 8.0
REJOIN_TIMEOUT_S = 8.0


def _argv(run_dir: Path, model: Path) -> list[str]:
    return [
        sys.executable, "-m", "speed_async", "train", "--config", str(REPO / "configs" / "tiny-cpu.toml"),
        f"model.path={model}", f"trainer.run_dir={run_dir}", f"trainer.total_steps={STEPS}",
        "trainer.save_every=2", f"pipeline.max_staleness={K}", f"data.train_batch_size={BATCH}",
        f"algorithm.mini_batch_size={BATCH // 2}", "rollout.n=4", "rollout.n_continue=4",
        "rollout.gen_batch_size=8", "rollout.max_response_length=48", "rollout.enforce_eager=true",
        "trainer.eval_every=0", "logging.progress=true", "logging.wandb_mode=disabled",
        f"pipeline.sampler_timeout_s={SAMPLER_TIMEOUT_S}", f"pipeline.rejoin_timeout_s={REJOIN_TIMEOUT_S}",
    ]  # fmt: skip


def _kill_everything(launcher: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the launcher and every process group it started (pids.json), by PID, never by name."""
    pids = json.loads((run_dir / "pids.json").read_text()).values()
    for pid in [launcher.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    for pid in pids:
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _signal_all(launcher: subprocess.Popen, run_dir: Path, sig: signal.Signals) -> None:
    """Signal the launcher and every process group it started (pids.json), by PID."""
    for pid in [launcher.pid, *json.loads((run_dir / "pids.json").read_text()).values()]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_time(pid: int) -> str | None:
    """/proc's start time of a running process (None when gone or a zombie): with the PID, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every running process below `root` (by /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if (started := _start_time(pid)) is not None:
            found[pid] = started
        todo += children.get(pid, [])
    return found


def _kill_the_launcher_alone(launcher: subprocess.Popen, run_dir: Path) -> None:
    """With every process of the run frozen: SIGKILL the launcher only, let the others run again, and check
    that each of them is gone within 20 s (they die with it; nothing here kills them, unless the check fails)."""
    processes = _descendants(launcher.pid)
    pids = json.loads((run_dir / "pids.json").read_text())
    assert {pids["learner"], pids["sampler[0]"], pids["learner[0]"]} <= set(processes), (pids, processes)
    assert len(processes) >= 5, f"torchrun, its worker, the sampler and their guards at least: {processes}"
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=30)
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while (alive := [p for p, t in processes.items() if _start_time(p) == t]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:  # leave nothing behind, then fail
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"processes of the run still alive 20 s after the launcher's SIGKILL: {alive}"


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if "time/step" in record:
                steps.append(record["step"])
    return steps


def _stop_the_only_sampler(tmp_path: Path, run_dir: Path, resumed_from: int) -> int:
    """Resume; after a step, SIGSTOP the sampler; the learner must report it, checkpoint and stop. Returns the
    version of the checkpoint it leaves."""
    log = (tmp_path / "second.log").open("wb")
    argv = [sys.executable, "-m", "speed_async", "train", "--resume", str(run_dir)]
    second = subprocess.Popen(argv, env=role_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.time()
    deadline = time.monotonic() + 300
    try:
        while json.loads((run_dir / ".lock").read_text().split("\n")[0])["pid"] != second.pid:  # resume has the lock
            assert second.poll() is None, f"second run ended early: {(tmp_path / 'second.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the resumed run did not take the run directory's lock"
            time.sleep(0.1)
        # One owner per run directory: another resume of it is refused at once, naming the live one.
        t0 = time.monotonic()
        third = subprocess.run(argv, env=role_env(), capture_output=True, text=True, timeout=60, check=False)
        assert third.returncode == 2 and f"in use by a live run: pid {second.pid} on host" in third.stderr, third
        assert time.monotonic() - t0 < 20, "refused at once (not after loading anything)"
        while not any(e["event"] == "trained" and e["t"] >= started for e in read_ledger(run_dir)):
            assert second.poll() is None, f"second run ended early: {(tmp_path / 'second.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no step of the resumed run within 300 s"
            time.sleep(0.2)
        sampler = json.loads((run_dir / "pids.json").read_text())["sampler[0]"]
        stopped_at = time.time()
        os.killpg(sampler, signal.SIGSTOP)
        # Lost after SAMPLER_TIMEOUT_S, stopped after REJOIN_TIMEOUT_S more, then a checkpoint and the exit:
        # the learner must not wait out pipeline.sync_timeout_s (120 s) for a broadcast to the stopped sampler.
        limit = SAMPLER_TIMEOUT_S + REJOIN_TIMEOUT_S + 60
        try:
            code = second.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            learner_log = run_dir / "logs" / "learner.log"
            tail = learner_log.read_text(errors="replace")[-4000:] if learner_log.exists() else "(no learner.log)"
            pytest.fail(
                f"the resumed run did not stop within {limit:.0f} s of its only sampler's SIGSTOP; launcher:\n"
                f"{(tmp_path / 'second.log').read_text(errors='replace')[-2000:]}\nlearner.log:\n{tail}"
            )
    finally:
        if second.poll() is None:
            _kill_everything(second, run_dir)
    out = (tmp_path / "second.log").read_text(errors="replace")
    assert code == 1, f"the launcher reports the stopped run:\n{out[-3000:]}"
    assert "took over the lock of" in out and "which ended without releasing it" in out, out[-3000:]
    assert "Expecting value" not in out, "the progress bar reads through the resume's rewrite of metrics.jsonl"
    events = [json.loads(line) for line in (run_dir / "samplers.jsonl").read_text().splitlines()]
    lost = [e for e in events if e["event"] == "lost" and e["pid"] == sampler]
    assert len(lost) == 1 and "silent for" in lost[0]["reason"] and "last heartbeat said" in lost[0]["reason"], lost
    assert lost[0]["waiting_for"].startswith(("the batch of step", "weights version", "the train step")), lost
    # Reported within the liveness timeout (+ a heartbeat interval and scheduling slack on a loaded machine).
    assert lost[0]["t"] - stopped_at < SAMPLER_TIMEOUT_S + 8, (lost, stopped_at)
    assert "no sampler has been alive for" in out and f"sampler 0 (pid {sampler} on" in out, out[-3000:]
    assert f"speed-async train --resume {run_dir}" in out
    version, _ = latest_checkpoint(run_dir) or (0, run_dir)
    steps = [r["step"] for r in effective(read_metrics(run_dir, include_rolled_back=True)) if "time/step" in r]
    assert version == max(steps) + 1 and resumed_from < version < STEPS, (version, steps, resumed_from)
    return version


@pytest.mark.timeout(900)  # three launches: a few minutes on an idle 2-core machine, much longer on a loaded one
def test_kill_and_resume_loses_and_repeats_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "run"
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        _argv(run_dir, tiny_model_dir), env=role_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    try:
        while True:  # kill once a step past the newest checkpoint is logged
            found = latest_checkpoint(run_dir)
            if found is not None and any(s >= found[0] for s in _steps(run_dir)):
                # Freeze every process, then look again: on a loaded machine the run may have written the next
                # checkpoint meanwhile, and then there would be nothing to roll back.
                _signal_all(first, run_dir, signal.SIGSTOP)
                found = latest_checkpoint(run_dir)
                if found is not None and any(s >= found[0] for s in _steps(run_dir)):
                    break
                _signal_all(first, run_dir, signal.SIGCONT)
            assert first.poll() is None, f"first run ended early: {(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no step past the first checkpoint within 300 s"
            time.sleep(0.2)
        _kill_the_launcher_alone(first, run_dir)
    finally:
        if first.poll() is None:
            _kill_everything(first, run_dir)
    restored = latest_checkpoint(run_dir)
    assert restored is not None
    killed_at = max(_steps(run_dir))
    assert killed_at < STEPS - 1, "the run must be killed before its end for this test to mean anything"

    stopped_version = _stop_the_only_sampler(tmp_path, run_dir, restored[0])

    third_start = time.time()
    resumed = subprocess.run(
        [sys.executable, "-m", "speed_async", "train", "--resume", str(run_dir)],
        env=role_env(),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}"

    records = read_metrics(run_dir, include_rolled_back=True)
    assert any(r.get("rolled_back") for r in records), "the killed run's records past the checkpoint are marked"
    steps = [r for r in effective(records) if "time/step" in r]
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert [r["policy_version"] for r in steps] == list(range(1, STEPS + 1)), "one version per RL step"
    assert all(0 <= r["staleness/max"] <= K for r in steps)

    ledger = list(read_ledger(run_dir))
    everything = list(read_ledger(run_dir, include_rolled_back=True))
    assert len(ledger) < len(everything), "the rolled-back tail is kept"
    resumed_part = everything[max(i for i, e in enumerate(everything) if e.get("rolled_back")) + 1 :]
    versions = {e["version"] for e in resumed_part if e["event"] == "dispatched"}
    assert min(versions) >= restored[0], "no work before the samplers hold the restored weights"
    last_part = [e for e in everything if e["event"] == "dispatched" and e["t"] >= third_start]
    assert last_part and min(e["version"] for e in last_part) >= stopped_version, "nor after the second resume"
    fates, _, dispatched = check_accounting(run_dir, ledger, STEPS, BATCH, K)
    assert fates <= dispatched
    assert (run_dir / "final_model" / "config.json").exists()
