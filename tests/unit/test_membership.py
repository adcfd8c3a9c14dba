"""Sampler membership (incarnations, liveness, weight-sync state, samplers.jsonl), the eval book's handling of a
lost sampler, the sampler's heartbeat thread, and the fault-tolerance settings of the config."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from speed_async.config import load_config
from speed_async.data.prepare import Prompt
from speed_async.orchestrator.evaluation import EvalBook, EvalOutcome
from speed_async.orchestrator.membership import EventLog, Membership
from speed_async.protocol import SAMPLER_ACTIVITIES, EvalResult, Heartbeat
from speed_async.sampler.heartbeat import HeartbeatThread
from speed_async.transport import Context, PullSocket

pytestmark = pytest.mark.timeout(60)


def test_membership_tracks_incarnations_liveness_and_groups(tmp_path: Path) -> None:
    members = Membership(2, EventLog(tmp_path / "samplers.jsonl"))
    a = members.join(b"s0-1", 0, 1, "h", required_version=0)
    members.join(b"s1-2", 1, 2, "h", required_version=0)
    assert members.live_ids() == [0, 1] and a.incarnation == 0
    assert members.needs_sync(), "joined samplers are outside any weight-sync group"
    members.group_formed(0, (0, 1))
    assert not members.needs_sync()
    members.mark_sync_failed(1, 0, "bucket 0 timed out")
    assert members.needs_sync()
    members.group_formed(1, (0, 1))
    members.mark_sync_failed(1, 0, "a stale report about generation 0")
    assert not members.needs_sync(), "a member of a newer generation reporting an old failure changes nothing"
    members.defer(1, 2)  # alive, but did not arrive at generation 2 (busy)
    assert members.syncable_ids() == [0] and members.live_ids() == [0, 1] and not members.needs_sync()
    members.mark_sync_failed(1, 2, "generation 2 abandoned")  # it reports back: take it in again
    assert members.syncable_ids() == [0, 1] and members.needs_sync()
    members.group_formed(3, (0, 1))
    time.sleep(0.25)
    members.touch(1, state="generating")
    assert [s.sampler_id for s in members.silent(0.2)] == [0]
    assert members.lose(0, "silent") is not None and members.lose(0, "again") is None
    assert members.none_alive_for() == 0.0 and members.touch(0) is None
    members.lose(1, "connection gone")
    time.sleep(0.05)
    assert members.none_alive_for() > 0
    assert "sampler 0 (pid 1 on h): silent" in members.lost_summary()
    again = members.join(b"s0-3", 0, 3, "h", required_version=5)
    assert again.incarnation == 1 and again.required_version == 5 and members.none_alive_for() == 0.0
    members.restart_clocks()
    members.close()
    events = [json.loads(line) for line in (tmp_path / "samplers.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == [
        "joined", "joined", "group_formed", "sync_failed", "group_formed", "deferred", "sync_failed",
        "group_formed", "lost", "lost", "joined",
    ]  # fmt: skip
    assert events[-1] == {**events[-1], "sampler": 0, "pid": 3, "incarnation": 1, "required_version": 5}


def test_an_evaluation_whose_sampler_is_lost_is_abandoned_not_reported_partially() -> None:
    prompts = [Prompt("src", np.arange(1, 3, dtype=np.int32), "1") for _ in range(4)]
    book = EvalBook(prompts, samples_per_prompt=2)
    shares = dict(book.assignments(7, [0, 1]))
    assert sorted(i.prompt_id for i in shares[0].items) == [0, 2] and shares[0].version == 7

    def result(sampler: int, prompt: int, version: int = 7, seconds: float = 0.5) -> EvalResult:
        return EvalResult(
            sampler_id=sampler,
            prompt_id=prompt,
            data_source="src",
            version=version,
            scores=np.array([1, 0], np.float32),
            response_lengths=np.array([3, 4], np.int32),
            seconds=seconds,
        )

    assert book.on_result(result(0, 0)) is None
    assert book.sampler_lost(1) == [7]
    assert book.on_result(result(0, 2)) is None, "an abandoned evaluation never completes"
    book.assignments(8, [0])
    done = [book.on_result(result(0, i, version=8)) for i in range(4)]
    assert done == [None, None, None, EvalOutcome(8, {"src": 0.5}, seconds=2.0)]
    assert book.on_result(result(0, 0, version=8)) is None, "late duplicates are ignored"


def test_an_evaluation_costs_the_time_of_its_slowest_sampler() -> None:
    prompts = [Prompt("src", np.arange(1, 3, dtype=np.int32), "1") for _ in range(4)]
    book = EvalBook(prompts, samples_per_prompt=2)
    book.assignments(3, [0, 1])  # prompts 0, 2 to sampler 0; 1, 3 to sampler 1; they evaluate in parallel
    outcomes = [
        book.on_result(
            EvalResult(
                sampler_id=i % 2, prompt_id=i, data_source="src", version=3, scores=np.array([1, 0], np.float32),
                response_lengths=np.array([3, 4], np.int32), seconds=1.5 if i % 2 else 0.25,
            )
        )
        for i in range(4)
    ]  # fmt: skip
    assert outcomes[-1] == EvalOutcome(3, {"src": 0.5}, seconds=3.0)


def test_heartbeats_keep_coming_while_the_main_thread_is_busy() -> None:
    with Context() as ctx:
        pull = PullSocket(ctx)
        endpoint = pull.bind_endpoint("127.0.0.1", 0)
        times = np.arange(len(SAMPLER_ACTIVITIES), dtype=np.float64)
        beat = HeartbeatThread(
            ctx, endpoint, 3, 0.1, lambda: (5, 2, "generating for 1.0 s"), key=None, max_bytes=4096, times=lambda: times
        )
        beat.start()
        start = time.monotonic()
        time.sleep(0.6)  # the "main loop" is busy and sends nothing
        got = []
        while time.monotonic() - start < 3 and len(got) < 3:
            msg = pull.recv(0.2)
            if msg is not None:
                got.append(msg)
        beat.stop()
        assert len(got) >= 3 and all(isinstance(m, Heartbeat) for m in got)
        assert (got[0].sampler_id, got[0].version, got[0].num_pending) == (3, 5, 2)
        assert got[0].state == "generating for 1.0 s"
        np.testing.assert_array_equal(got[0].times, times)
        assert not beat._thread.is_alive()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pipeline.rejoin_timeout_s=0"], r"pipeline.rejoin_timeout_s = 0(\.0)? is invalid: must be > 0"),
        (["pipeline.startup_timeout_s=-1"], r"pipeline.startup_timeout_s = -1(\.0)? is invalid"),
        (
            ["pipeline.collective_timeout_s=100", "pipeline.progress_timeout_s=40", "pipeline.rejoin_timeout_s=50"],
            r"pipeline.collective_timeout_s = 100(\.0)? is invalid: must be > progress_timeout_s \+ sampler_time",
        ),
        (["cluster.max_sampler_restarts=-1"], r"cluster.max_sampler_restarts = -1 is invalid: must be >= 0"),
    ],
)
def test_fault_settings_are_validated(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_heartbeat_interval_follows_the_liveness_timeout() -> None:
    assert load_config(None, []).pipeline.heartbeat_s == 0.5
    assert load_config(None, ["pipeline.sampler_timeout_s=1"]).pipeline.heartbeat_s == 0.25
