"""A sampler killed while its requests are paused in a weight update: nothing lost or repeated.

A real run (torchrun learner, two vLLM samplers, gloo weight sync, ZeroMQ; k = 1, `rollout.weight_update_mode =
keep`). To catch sampler 1 inside an update, the test reads its log every few milliseconds; when it says
"loading weights vN (keep) with M requests in flight" (M > 0) with no "weights vN loaded" after it, the
sampler is frozen (SIGSTOP) and the log read again: if the update is still unfinished, the process is frozen
between the two lines, with its engine paused and its requests in flight; it is then killed (SIGKILL). If the
update finished in between, the sampler is resumed (SIGCONT) and the next update is tried. (An earlier version
froze sampler 0 to make the learner's broadcast, and with it sampler 1's update, wait; on a machine whose
socket buffers held every broadcast the update never waited and the run ended first.) The launcher restarts
sampler 1; the learner re-issues what it held, abandons the broadcast and forms a new weight-sync generation.
Checked through the run directory: the run reaches its last step, every step trained BATCH groups with
lag <= K, every dispatched prompt has at most one fate (and one without a fate was pending at the end), what
the killed sampler held was re-issued and has a fate or is pending.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speed_async.metrics import read_metrics
from tests.e2e.harness import REPO, check_accounting
from tests.e2e.test_faults import _env, _holds_work, _kill_run, _ledger, _pids, _signal, _wait

pytestmark = pytest.mark.e2e

STEPS = 20
BATCH = 4
K = 1
LOADING = re.compile(r"sampler 1: loading weights v(\d+) \(keep\) with (\d+) requests in flight")


def _argv(run_dir: Path, model: Path) -> list[str]:
    return [
        sys.executable, "-m", "speed_async", "train", "--config", str(REPO / "configs" / "tiny-cpu.toml"),
        f"model.path={model}", f"trainer.run_dir={run_dir}", f"trainer.total_steps={STEPS}",
        f"pipeline.max_staleness={K}", "rollout.weight_update_mode=keep", f"data.train_batch_size={BATCH}",
        f"algorithm.mini_batch_size={BATCH // 2}", "rollout.n=4", "rollout.n_continue=4", "rollout.gen_batch_size=16",
        "rollout.max_response_length=48", "rollout.enforce_eager=true", "trainer.eval_every=0",
        "logging.progress=false", "logging.wandb_mode=disabled", "cluster.num_samplers=2",
        "cluster.max_sampler_restarts=2", "pipeline.sampler_timeout_s=30", "pipeline.sync_timeout_s=30",
        "pipeline.request_timeout_s=30", "pipeline.startup_timeout_s=400",
    ]  # fmt: skip


def _paused_in_update(log: Path, since: int) -> tuple[int, int] | None:
    """(version, requests in flight) when the log, from byte `since`, ends inside a weight update of sampler 1."""
    text = log.read_bytes()[since:].decode(errors="replace")
    started = list(LOADING.finditer(text))
    if not started:
        return None
    version, in_flight = int(started[-1].group(1)), int(started[-1].group(2))
    loaded = f"sampler 1: weights v{version} loaded"
    return None if loaded in text[started[-1].end() :] else (version, in_flight)


def _freeze_in_update(pid: int, log: Path, since: int, launcher: subprocess.Popen, timeout_s: float) -> tuple:
    """Freeze sampler `pid` between its "loading weights" and "weights loaded" lines; (version, in flight, log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert launcher.poll() is None, "the run ended while waiting for sampler 1 to load weights"
        found = _paused_in_update(log, since)
        if found is not None and found[1] > 0:
            _signal(pid, signal.SIGSTOP)
            time.sleep(0.05)  # the stop has taken effect; a line written before it is in the file
            if _paused_in_update(log, since) == found:
                return (*found, log.read_bytes()[since:].decode(errors="replace"))
            _signal(pid, signal.SIGCONT)  # it finished loading in between: try the next update
        time.sleep(0.002)
    raise AssertionError(f"sampler 1 was not caught inside a weight update within {timeout_s} s")


@pytest.mark.timeout(1200)  # start-ups take minutes on a loaded machine
def test_sampler_killed_while_paused_in_a_weight_update_loses_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "run"
    log = run_dir / "logs" / "sampler-1.log"
    launcher = subprocess.Popen(
        _argv(run_dir, tiny_model_dir),
        env=_env(),
        stdout=(tmp_path / "launcher.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        since = time.time()
        _wait("work on sampler 1", lambda: _holds_work(run_dir, 1, since), launcher, 400)
        victim = _pids(run_dir)["sampler[1]"]
        version, in_flight, killed_log = _freeze_in_update(victim, log, 0, launcher, 300)
        _signal(victim, signal.SIGKILL)
        code = launcher.wait(timeout=600)
    finally:
        _kill_run(launcher, run_dir)
    out = (tmp_path / "launcher.log").read_text(errors="replace")
    assert code == 0, f"the run reaches its last step:\n{out[-4000:]}"
    assert in_flight > 0, f"sampler 1 held no requests when it paused for v{version}:\n{killed_log[-2000:]}"
    assert f"sampler 1: weights v{version} loaded" not in killed_log
    assert f"sampler[1] (pid {victim}) was killed by SIGKILL" in out, out[-3000:]

    steps = [r for r in read_metrics(run_dir) if "time/step" in r]
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert all(0 <= r["staleness/max"] <= K for r in steps)
    ledger = _ledger(run_dir)
    fates, pending, _ = check_accounting(run_dir, ledger, STEPS, BATCH, K)
    # What the killed sampler held went back to the dispatcher and was trained, rejected, dropped or is pending.
    reissued = {(e["epoch"], e["prompt_id"]) for e in ledger if e["event"] == "reissued" and e.get("sampler") == 1}
    assert reissued, "the killed sampler held prompts, and they were re-issued"
    assert reissued <= fates | pending, sorted(reissued - fates - pending)
