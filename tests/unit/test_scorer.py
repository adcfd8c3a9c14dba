"""The sampler's scorer: its pump thread stays off the engine's core."""

from __future__ import annotations

import os
import threading
import time

import pytest

from speed_async.config import load_config
from speed_async.sampler.scoring import Scorer
from tests.unit._threads import task_cpus

pytestmark = pytest.mark.timeout(120)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_reward_pump_thread_runs_on_the_cores_it_is_given() -> None:
    cores = sorted(os.sched_getaffinity(0))
    config = load_config(None, ["pipeline.reward_workers=1"])
    scorer = Scorer(config, tokenizer=None, cpus=set(cores), pump_cpus={cores[0]})
    try:
        pump = next(t for t in threading.enumerate() if t.name == "reward-pump")
        deadline = time.monotonic() + 5
        assert pump.native_id is not None
        while task_cpus(pump.native_id) != {cores[0]} and time.monotonic() < deadline:
            time.sleep(0.01)  # the thread pins itself when it starts
        assert task_cpus(pump.native_id) == {cores[0]}
        assert os.sched_getaffinity(0) == set(cores)  # the caller's own cores are left as they were
    finally:
        scorer.close()


def test_a_pump_thread_that_cannot_be_pinned_says_so_and_keeps_running(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, ["pipeline.reward_workers=1"])
    scorer = Scorer(config, tokenizer=None, pump_cpus={4095})  # no such core: sched_setaffinity fails
    try:
        pump = next(t for t in threading.enumerate() if t.name == "reward-pump")
        deadline = time.monotonic() + 5
        while "pinning it to {4095} failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "the reward pump thread stays on its cores: pinning it to {4095} failed" in caplog.text
        assert pump.is_alive()
    finally:
        scorer.close()
