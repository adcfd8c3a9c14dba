"""Kill -9 every process of a real run after its first checkpoint, `speed-async train --resume` it to the end,
and check through the run directory that nothing was lost or repeated.

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
from collections import Counter
from pathlib import Path

import pytest

from speed_async.learner.checkpoint import effective, latest_checkpoint, unpack_head_state
from speed_async.learner.ledger import read_ledger
from speed_async.metrics import read_metrics
from tests.e2e.harness import REPO, role_env

pytestmark = pytest.mark.e2e

STEPS = 6
BATCH = 4
K = 1
FATES = ("trained", "rejected", "dropped")


def _argv(run_dir: Path, model: Path) -> list[str]:
    return [
        sys.executable, "-m", "speed_async", "train", "--config", str(REPO / "configs" / "tiny-cpu.toml"),
        f"model.path={model}", f"trainer.run_dir={run_dir}", f"trainer.total_steps={STEPS}",
        "trainer.save_every=2", f"pipeline.max_staleness={K}", f"data.train_batch_size={BATCH}",
        f"algorithm.mini_batch_size={BATCH // 2}", "rollout.n=4", "rollout.n_continue=4",
        "rollout.gen_batch_size=8", "rollout.max_response_length=48", "rollout.enforce_eager=true",
        "trainer.eval_every=0", "logging.progress=false", "logging.wandb_mode=disabled",
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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


def test_kill_and_resume_loses_and_repeats_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "run"
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        _argv(run_dir, tiny_model_dir), env=role_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 240
    try:
        while True:  # kill once a step past the first checkpoint is logged
            found = latest_checkpoint(run_dir)
            if found is not None and any(s >= found[0] for s in _steps(run_dir)):
                break
            assert first.poll() is None, f"first run ended early: {(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no step past the first checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        _kill_everything(first, run_dir)
    restored = latest_checkpoint(run_dir)
    assert restored is not None
    killed_at = max(_steps(run_dir))
    assert killed_at < STEPS - 1, "the run must be killed before its end for this test to mean anything"

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
    trained = [e for e in ledger if e["event"] == "trained"]
    assert Counter(e["step"] for e in trained) == {s: BATCH for s in range(STEPS)}
    assert all(0 <= e["lag"] <= K for e in trained), "no group beyond the staleness bound is ever trained"
    fates = Counter((e["epoch"], e["prompt_id"]) for e in ledger if e["event"] in FATES)
    assert max(fates.values()) == 1, f"prompts with several fates: {[k for k, n in fates.items() if n > 1]}"

    version, final = latest_checkpoint(run_dir) or (0, run_dir)
    assert version == STEPS
    head = unpack_head_state((final / "head.msgpack").read_bytes())
    pending = {tuple(k) for k in head.dispatch["reissue"]} | {tuple(k) for k in head.dispatch["ready_keys"]}
    tail = (run_dir / "ledger.jsonl").read_bytes()[head.ledger_offset :].decode().splitlines()
    late = {(e["epoch"], e["prompt_id"]) for e in map(json.loads, tail) if e["event"] == "dispatched"}
    dispatched = {(e["epoch"], e["prompt_id"]) for e in ledger if e["event"] == "dispatched"}
    lost = dispatched - set(fates) - pending - late
    assert not lost, f"dispatched prompts with no fate that were not in flight at the end: {sorted(lost)}"
    assert set(fates) <= dispatched
    assert (run_dir / "final_model" / "config.json").exists()
