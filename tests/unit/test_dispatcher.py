"""The dispatcher on real loopback sockets, with the test playing the samplers (DEALER + PUSH per sampler).

Checks sampler faults at the dispatcher: a silent sampler is declared lost within the liveness timeout and its
in-flight prompts are re-issued first; a restarted sampler (new process, same id) replaces the old one and
gets no work before it holds the current weights; an old process is answered with Shutdown, a lost one with
Rejoin; with no sampler left `next_batch` gives up the step (a batch already taken goes back) and names the
lost samplers; invalid frames and strangers' messages are counted, never fatal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from speed_async.config import Config, load_config
from speed_async.data.prepare import Prompt
from speed_async.orchestrator.dispatcher import Dispatcher, SamplersLost, StopRequested
from speed_async.orchestrator.ledger import Ledger, read_ledger
from speed_async.protocol import (
    SAMPLER_ACTIVITIES,
    Heartbeat,
    Hello,
    Message,
    NoWork,
    Rejoin,
    RolloutGroup,
    ScreenReport,
    Shutdown,
    SyncDone,
    WorkAssignment,
    WorkRequest,
    encode,
)
from speed_async.transport import Context, DealerSocket, PushSocket

TIMES = np.zeros(len(SAMPLER_ACTIVITIES), dtype=np.float64)

pytestmark = pytest.mark.timeout(120)
TIMEOUT_S = 1.0  # pipeline.sampler_timeout_s of these tests


def _config(**pipeline: float) -> Config:
    overrides = [
        "curriculum.mode=none",
        "rollout.n=2",
        "rollout.n_continue=0",
        "data.train_batch_size=2",
        "algorithm.mini_batch_size=2",
        "pipeline.max_staleness=1",
        "cluster.num_samplers=2",
        f"pipeline.sampler_timeout_s={TIMEOUT_S}",
        "pipeline.rejoin_timeout_s=1.0",
        "pipeline.max_message_bytes=65536",
    ]
    overrides += [f"pipeline.{k}={v}" for k, v in pipeline.items()]
    return load_config(None, overrides)


PROMPTS = [Prompt("t", np.arange(1, 4, dtype=np.int32), str(i)) for i in range(50)]


class FakeSampler:
    """The sampler's side of the wire, driven by the test (no engine)."""

    def __init__(self, ctx: Context, dispatcher: Dispatcher, sampler_id: int, pid: int) -> None:
        self.sampler_id, self.pid = sampler_id, pid
        self.dealer = DealerSocket(ctx, dispatcher.work_endpoint, f"sampler-{sampler_id}-{pid}".encode())
        self.push = PushSocket(ctx, dispatcher.results_endpoint)

    def hello(self) -> None:
        self.dealer.send(Hello(sampler_id=self.sampler_id, pid=self.pid, hostname="test"), timeout_s=1.0)

    def request(self, version: int = 0, max_prompts: int = 4) -> Message:
        self.dealer.send(WorkRequest(sampler_id=self.sampler_id, version=version, max_prompts=max_prompts), 1.0)
        return self.expect(WorkAssignment | NoWork | Rejoin | Shutdown)

    def expect(self, kind: type | object, timeout_s: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.dealer.recv(0.1)
            if msg is not None and isinstance(msg, kind):  # type: ignore[arg-type]
                return msg
        raise AssertionError(f"sampler {self.sampler_id}: no {kind} within {timeout_s} s")

    def beat(self, version: int = 0) -> None:
        self.push.send(
            Heartbeat(sampler_id=self.sampler_id, version=version, num_pending=0, state="idle", times=TIMES), 1.0
        )

    def group(self, epoch: int, prompt_id: int, version: int = 0) -> None:
        n = 2
        self.push.send(
            RolloutGroup(
                sampler_id=self.sampler_id,
                prompt_id=prompt_id,
                epoch=epoch,
                data_source="t",
                prompt_token_ids=np.arange(1, 4, dtype=np.int32),
                response_token_ids=np.arange(2 * n, dtype=np.int32),
                response_lengths=np.full(n, 2, np.int32),
                response_logprobs=np.zeros(2 * n, np.float32),
                rewards=np.array([1, 0], np.float32),
                scores=np.array([1, 0], np.float32),
                finish_reasons=["stop"] * n,
                version_min=np.full(n, version, np.int32),
                version_max=np.full(n, version, np.int32),
                num_screen=n,
            ),
            1.0,
        )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Dispatcher, Context, Path]]:
    ledger = Ledger(tmp_path)
    dispatcher = Dispatcher(_config(), PROMPTS, [], ledger, key=None, sync_master=("127.0.0.1", 1), run_dir=tmp_path)
    dispatcher.start()
    ctx = Context()
    yield dispatcher, ctx, tmp_path
    dispatcher.stop("test over")
    ledger.close()
    ctx.close()


def _wait(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _keys(msg: Message) -> list[tuple[int, int]]:
    assert isinstance(msg, WorkAssignment), msg
    return [(item.epoch, item.prompt_id) for item in msg.items]


def test_a_silent_sampler_is_lost_within_the_timeout_and_its_work_goes_to_the_other(
    setup: tuple[Dispatcher, Context, Path],
) -> None:
    dispatcher, ctx, run_dir = setup
    a, b = FakeSampler(ctx, dispatcher, 0, 100), FakeSampler(ctx, dispatcher, 1, 101)
    a.hello()
    b.hello()
    dispatcher.wait_for_samplers(5.0)
    held = _keys(a.request(max_prompts=3))
    silent_since = time.monotonic()
    while dispatcher.live_samplers() != [1]:  # b keeps beating, a says nothing
        b.beat()
        time.sleep(0.1)
        assert time.monotonic() - silent_since < TIMEOUT_S + 2, "sampler 0 not declared lost in time"
    assert time.monotonic() - silent_since > TIMEOUT_S * 0.9
    assert _keys(b.request(max_prompts=3)) == held, "the lost sampler's prompts are handed out again, first"
    ledger = list(read_ledger(run_dir))
    reissued = [(e["epoch"], e["prompt_id"]) for e in ledger if e["event"] == "reissued"]
    assert reissued == held and all(e["reason"] == "sampler lost" for e in ledger if e["event"] == "reissued")
    events = [json.loads(line) for line in (run_dir / "samplers.jsonl").read_text().splitlines()]
    lost = [e for e in events if e["event"] == "lost"]
    assert len(lost) == 1 and lost[0]["sampler"] == 0 and lost[0]["in_flight"] == 3
    assert "silent for" in lost[0]["reason"] and "'idle'" not in lost[0]["reason"]
    # The lost process speaks again (it was only stopped): it is told to rejoin, and its results are ignored.
    assert isinstance(a.request(), Rejoin)
    a.group(*held[0])
    _wait(lambda: dispatcher.transport_metrics["transport/rejected/unknown_sender"] >= 2)
    # It says hello again: a new incarnation that needs the current weights (version 0 here) -> work again.
    a.hello()
    _wait(lambda: dispatcher.live_samplers() == [0, 1])
    assert isinstance(a.request(), WorkAssignment | NoWork)


def test_a_restarted_sampler_replaces_the_old_one_and_waits_for_the_current_weights(
    setup: tuple[Dispatcher, Context, Path],
) -> None:
    dispatcher, ctx, _ = setup
    old, other = FakeSampler(ctx, dispatcher, 0, 200), FakeSampler(ctx, dispatcher, 1, 201)
    old.hello()
    other.hello()
    dispatcher.wait_for_samplers(5.0)
    held = _keys(old.request(max_prompts=2))
    dispatcher.mark_published(3)  # the samplers now train-generate at version 3
    _wait(lambda: dispatcher.state.version == 3)
    new = FakeSampler(ctx, dispatcher, 0, 202)  # same sampler id, new process
    new.hello()
    _wait(lambda: dispatcher.members.get(0) is not None and dispatcher.members.get(0).pid == 202)
    info = dispatcher.members.get(0)
    assert info.incarnation == 1 and info.required_version == 3
    reply = new.request(version=0)
    assert isinstance(reply, NoWork) and "waiting for weights version 3" in reply.reason
    new.dealer.send(SyncDone(sampler_id=0, version=3, seconds=0.1), 1.0)
    assert _keys(new.request(version=3, max_prompts=2)) == held, "the old process's prompts, re-issued first"
    assert isinstance(old.request(), Shutdown), "the replaced process is told to stop"
    assert dispatcher.members.needs_sync(), "the publisher must form a group with the new process"
    dispatcher.members.group_formed(0, (0, 1))
    assert not dispatcher.members.needs_sync()


def test_with_no_sampler_left_the_step_is_given_up_and_the_batch_goes_back(
    setup: tuple[Dispatcher, Context, Path],
) -> None:
    dispatcher, ctx, run_dir = setup
    a, b = FakeSampler(ctx, dispatcher, 0, 300), FakeSampler(ctx, dispatcher, 1, 301)
    a.hello()
    b.hello()
    dispatcher.wait_for_samplers(5.0)
    keys = _keys(a.request(max_prompts=4))
    for key in keys[:2]:
        a.group(*key)
    groups = dispatcher.next_batch(0, no_progress_s=30, rejoin_timeout_s=30, stop_check=lambda: None)
    assert [(g.epoch, g.prompt_id) for g in groups] == keys[:2]
    a.group(*keys[2])  # one of the two groups of step 1
    _wait(lambda: len(dispatcher.state.ready) == 1)
    with pytest.raises(StopRequested, match=r"stop requested: sampler\[1\] failed"):
        dispatcher.next_batch(1, no_progress_s=30, rejoin_timeout_s=30, stop_check=lambda: "sampler[1] failed")
    # A batch already taken for a step that is then given up goes back to the ready FIFO, in order.
    a.group(*keys[3])
    dispatcher._commands.put(("batch", 1))  # what next_batch(1) asks; the batch is taken, not consumed
    _wait(lambda: not dispatcher._batches.empty())
    assert not dispatcher.state.ready
    dispatcher.cancel_batch(1)
    assert [k for k, _ in dispatcher.state.ready] == keys[2:]
    assert dispatcher.state.next_step == 1
    assert len(dispatcher.next_batch(1, no_progress_s=30, rejoin_timeout_s=30, stop_check=lambda: None)) == 2
    start = time.monotonic()  # the samplers go silent
    with pytest.raises(SamplersLost, match=r"no sampler has been alive .*sampler 0 \(pid 300 on test\): silent"):
        dispatcher.next_batch(2, no_progress_s=30, rejoin_timeout_s=1.0, stop_check=lambda: None)
    assert time.monotonic() - start < TIMEOUT_S + 1.0 + 3, "lost after the liveness timeout + rejoin timeout"
    trained = [e for e in read_ledger(run_dir) if e["event"] == "trained"]
    assert [(e["epoch"], e["prompt_id"], e["step"]) for e in trained] == [
        *[(*k, 0) for k in keys[:2]],
        *[(*k, 1) for k in keys[2:]],
    ]


def test_invalid_frames_and_strangers_are_counted_and_the_dispatcher_keeps_serving(
    setup: tuple[Dispatcher, Context, Path],
) -> None:
    dispatcher, ctx, _ = setup
    a = FakeSampler(ctx, dispatcher, 0, 400)
    a.hello()
    _wait(lambda: dispatcher.live_samplers() == [0])
    raw_push = ctx.zmq.socket(zmq.PUSH)
    raw_push.connect(dispatcher.results_endpoint)
    raw_dealer = ctx.zmq.socket(zmq.DEALER)
    raw_dealer.connect(dispatcher.work_endpoint)
    report = ScreenReport(sampler_id=0, prompt_id=1, epoch=0, version=0, rewards=np.ones(2, np.float32), qualified=True)
    frame = encode(report)
    tag, version, body, mac = msgpack.unpackb(frame)
    for sock in (raw_push, raw_dealer):
        sock.send(b"\x00garbage")  # malformed
        sock.send(frame[: len(frame) // 2])  # truncated
        sock.send(msgpack.packb([tag, version + 1, body, mac], use_bin_type=True))  # another schema version
        sock.send(b"x" * (dispatcher.config.pipeline.max_message_bytes + 10))  # oversized
    stranger = ScreenReport(
        sampler_id=1, prompt_id=1, epoch=0, version=0, rewards=np.ones(2, np.float32), qualified=True
    )
    raw_push.send(encode(stranger))  # valid, but sampler 1 never said hello
    _wait(lambda: dispatcher.transport_metrics["transport/rejected_messages"] >= 9)
    metrics = dispatcher.transport_metrics
    assert metrics["transport/rejected/oversized"] == 2
    assert metrics["transport/rejected/malformed"] == 4
    assert metrics["transport/rejected/bad_version"] == 2
    assert metrics["transport/rejected/unknown_sender"] == 1
    assert metrics["transport/rejected_messages"] == 9
    assert isinstance(a.request(), WorkAssignment), "still serving"
    raw_push.close(0)
    raw_dealer.close(0)
