"""The sampler loop's messages: what it sends the learner and what it does with each message from the dispatcher.

`ChannelMixin` is a base class of `speed_async.sampler.loop.SamplerLoop` and works on the loop's state (its
sockets, engine, request book, group assembler, weight sync). Sending goes through `_send_control` (the work
channel, DEALER) or `_emit` (the results channel, PUSH); a send blocked for pipeline.request_timeout_s raises
`LearnerUnresponsive`. `_drain` handles every waiting message from the dispatcher: work and evaluation items
are queued, continue decisions passed to the assembler, weight updates held for the loop to load between two
engine steps (`speed_async.sampler.updates`), `Rejoin` drops all work and says hello again, `Shutdown` stops
the loop. `_heartbeat` also beats on the work channel now and then (the learner answers a sampler it lost with
`Rejoin`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from speed_async.curriculum.groups import GroupAssembler
from speed_async.protocol import (
    ContinueDecision,
    EvalAssignment,
    Heartbeat,
    Hello,
    JoinSyncGroup,
    Message,
    NoWork,
    Rejoin,
    Shutdown,
    UpdateWeights,
    WorkAssignment,
)
from speed_async.sampler.sync import LearnerUnresponsive
from speed_async.sampler.wire import work_from_item
from speed_async.transport import TransportTimeout

if TYPE_CHECKING:
    from speed_async.config import Config
    from speed_async.curriculum.groups import PromptWork
    from speed_async.sampler.activity import ActivityClock
    from speed_async.sampler.engine import Engine
    from speed_async.sampler.inflight import RequestBook
    from speed_async.sampler.loop import SamplerEndpoints
    from speed_async.sampler.scoring import Scorer
    from speed_async.sampler.sync import WeightSync
    from speed_async.transport import DealerSocket, PushSocket

__all__ = ["BOUND_REASONS", "HEARTBEAT_EVERY_S", "ChannelMixin"]

log = logging.getLogger("speed_async.sampler")
HEARTBEAT_EVERY_S = 2.0
"""How often the main loop also beats on the work channel (the learner answers a sampler it lost with Rejoin)."""
BOUND_REASONS = ("staleness bound", "waiting for weights")
"""NoWork reasons that mean: newer weights are needed first (time charged to idle_weights, not idle_work)."""


class ChannelMixin:
    """The sampler loop's sending, message handling and work-channel heartbeat (state: the loop's, below)."""

    config: Config
    sampler_id: int
    engine: Engine
    scorer: Scorer
    assembler: GroupAssembler
    book: RequestBook
    clock: ActivityClock
    endpoints: SamplerEndpoints
    dealer: DealerSocket
    push: PushSocket
    sync: WeightSync
    pending_update: UpdateWeights | None
    eval_items: list[tuple[PromptWork, int]]
    decision_due: dict[tuple[int, int], float]
    request_sent_at: float | None
    retry_at: float
    bound_wait: bool
    last_heartbeat: float
    stopping: str | None
    t_first_work: float | None

    def _new_assembler(self) -> GroupAssembler:
        cur = self.config.curriculum
        return GroupAssembler(cur.mode, cur.pass_rate_low, cur.pass_rate_high)

    def _status(self) -> tuple[int, int, str]:
        """(version, pending items, state) for the heartbeat thread."""
        assembler = self.assembler
        pending = assembler.num_new + assembler.num_pending + assembler.num_continue + self.engine.num_unfinished
        return self.engine.version, pending, f"{self.clock.current}, {self.engine.num_unfinished} requests in flight"

    def _send_control(self, msg: Message) -> None:
        self._send(self.dealer, msg, self.endpoints.work)

    def _emit(self, msg: Message) -> None:
        self._send(self.push, msg, self.endpoints.results)

    def _send(self, sock: DealerSocket | PushSocket, msg: Message, endpoint: str) -> None:
        timeout = self.config.pipeline.request_timeout_s
        doing = self.clock.current
        self.clock.switch("sending")
        try:
            sock.send(msg, timeout_s=timeout)
        except TransportTimeout:
            raise LearnerUnresponsive(
                f"sampler {self.sampler_id}: the learner is unresponsive: sending {msg.TAG} to {endpoint} was "
                f"blocked for {timeout:g} s (pipeline.request_timeout_s): the learner takes no messages"
            ) from None
        finally:
            self.clock.switch(doing)

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, WorkAssignment):
            if self.t_first_work is None:
                self.t_first_work = time.perf_counter()
            self.request_sent_at, self.bound_wait = None, False
            self.assembler.add(work_from_item(item) for item in msg.items)
        elif isinstance(msg, NoWork):
            self.request_sent_at = None
            self.retry_at = time.monotonic() + msg.retry_after_s
            self.bound_wait = msg.reason.startswith(BOUND_REASONS)
        elif isinstance(msg, ContinueDecision):
            key = (msg.epoch, msg.prompt_id)
            self.decision_due.pop(key, None)
            self.assembler.decide(key, msg.go)
        elif isinstance(msg, EvalAssignment):
            self.eval_items.extend((work_from_item(item), msg.version) for item in msg.items)
        elif isinstance(msg, JoinSyncGroup):
            self.pending_update = None
            self.clock.switch("weights")
            self.sync.join(msg)
        elif isinstance(msg, UpdateWeights):
            if msg.generation == self.sync.generation:
                self.pending_update = msg
            else:  # announced on a generation this engine is not (or no longer) in
                log.info(
                    "sampler %d: update v%d on generation %d ignored", self.sampler_id, msg.version, msg.generation
                )
        elif isinstance(msg, Rejoin):
            self._rejoin(msg.reason)
        elif isinstance(msg, Shutdown):
            self.stopping = msg.reason
        else:
            log.warning("sampler %d: unexpected %s on the work channel", self.sampler_id, type(msg).__name__)

    def _rejoin(self, reason: str) -> None:
        """The learner lost this sampler: drop all work (it was re-issued), leave the group, say hello again."""
        log.warning("sampler %d: the learner asks it to rejoin (%s); dropping its work", self.sampler_id, reason)
        self.engine.abort(self.book.clear())
        self.scorer.forget()
        self.assembler = self._new_assembler()
        self.decision_due.clear()
        self.eval_items, self.pending_update, self.request_sent_at, self.retry_at = [], None, None, 0.0
        self.sync.leave()
        self._send_control(Hello(sampler_id=self.sampler_id, pid=os.getpid(), hostname=socket.gethostname()))

    def _drain(self, timeout_s: float) -> None:
        """Handle every message already waiting; wait up to `timeout_s` for the first one."""
        msg = self.dealer.recv(timeout_s)
        while msg is not None:
            self._handle(msg)
            msg = self.dealer.recv(0.0)

    def _heartbeat(self) -> None:
        """Also beat on the work channel now and then: the learner answers a sampler it lost with Rejoin."""
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_EVERY_S:
            version, pending, state = self._status()
            beat = Heartbeat(
                sampler_id=self.sampler_id,
                version=version,
                num_pending=pending,
                state=state[:200],
                times=self.clock.snapshot(),
            )
            self._send_control(beat)
            self.last_heartbeat = now
