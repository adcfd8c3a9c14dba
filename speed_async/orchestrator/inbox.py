"""The dispatcher's inbox: what learner rank 0's dispatcher thread does with each message from a sampler.

`InboxMixin` is a base class of `speed_async.orchestrator.dispatcher.Dispatcher` and works on its state (the
sampler link and its sockets, membership, the training books, the evaluation book, the queues to the train
loop). `_serve_sockets` reads what is waiting on both sockets, results first (a sampler pushes its screening
reports before it asks for more work, so a work request is answered with those prompts already counted);
control messages (ROUTER: Hello, WorkRequest, Heartbeat, SyncDone, SyncFailed) go to `_on_control`, results
(PULL: ScreenReport, RolloutGroup, GroupDropped, EvalResult, RewardStats, Heartbeat) to `_on_result`.
`_check_liveness` declares a sampler lost when it has been silent for pipeline.sampler_timeout_s. No message
can stop the dispatcher: unknown senders and unexpected kinds are counted and dropped.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING

import numpy as np

from speed_async.protocol import (
    ContinueDecision,
    EvalResult,
    GroupDropped,
    Heartbeat,
    Hello,
    Message,
    NoWork,
    RewardStats,
    RolloutGroup,
    ScreenReport,
    SyncDone,
    SyncFailed,
    WorkAssignment,
    WorkRequest,
)

if TYPE_CHECKING:
    from collections import Counter

    from speed_async.config import Config
    from speed_async.curriculum.dispatch import DispatchState
    from speed_async.curriculum.train_group import TrainGroup
    from speed_async.orchestrator.evaluation import EvalBook, EvalOutcome
    from speed_async.orchestrator.intake import TrainingBooks
    from speed_async.orchestrator.membership import Membership, SamplerInfo
    from speed_async.orchestrator.sampler_link import SamplerLink

__all__ = ["NO_WORK_RETRY_S", "InboxMixin"]

log = logging.getLogger("speed_async.dispatcher")  # the dispatcher's logger: its lines keep their name

NO_WORK_RETRY_S = 0.2
"""How soon a sampler told NoWork asks again."""


class InboxMixin:
    """The dispatcher thread's handling of sampler messages (state: the Dispatcher's, below)."""

    config: Config
    books: TrainingBooks
    link: SamplerLink
    members: Membership
    evals: EvalBook
    _evals: queue.Queue[EvalOutcome]
    progress_at: float
    step_stats: dict[str, float]
    sampler_times: dict[int, np.ndarray]
    transport_metrics: dict[str, float]
    min_work_version: int
    # The Dispatcher also provides: state (DispatchState[TrainGroup]), counters (Counter[str]), _try_batch() (hand
    # the train loop its batch once the books have one) and _lose(sampler_id, reason).
    state: DispatchState[TrainGroup]
    counters: Counter[str]

    def _serve_sockets(self) -> bool:
        # Results first: a sampler pushes its screening reports before it asks for more work, so the request
        # is then answered with those prompts counted as qualified or rejected, not as still screening.
        got = False
        for _ in range(256):
            msg = self.link.pull.recv(0.0)
            if msg is None:
                break
            got = True
            self._on_result(msg)
        for _ in range(256):
            item = self.link.router.recv(0.0)
            if item is None:
                break
            got = True
            self._on_control(*item)
        if got:
            self._try_batch()
        new = self.link.transport_metrics()
        if new != self.transport_metrics:
            self.transport_metrics = new
        return got

    def _on_control(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, Hello):
            self.link.hello(identity, msg, max(self.state.version, self.min_work_version))
            return
        info = self.link.control_sender(identity, msg)
        if info is None:
            return
        sampler_id = info.sampler_id
        if isinstance(msg, WorkRequest):
            self._on_work_request(info, msg)
        elif isinstance(msg, Heartbeat):
            self.members.touch(sampler_id, version=msg.version, state=msg.state)
            self.sampler_times = {**self.sampler_times, sampler_id: msg.times}
        elif isinstance(msg, SyncDone):
            self.members.touch(sampler_id, version=msg.version)
            self.step_stats = {"weight_sync/reload_seconds": msg.seconds}
        elif isinstance(msg, SyncFailed):
            self.members.touch(sampler_id)
            log.warning("%s failed weight sync (generation %d): %s", info.describe(), msg.generation, msg.error)
            self.members.mark_sync_failed(sampler_id, msg.generation, msg.error)
        else:
            self.counters[f"unexpected_{type(msg).__name__}"] += 1

    def _on_work_request(self, info: SamplerInfo, msg: WorkRequest) -> None:
        self.members.touch(info.sampler_id, version=msg.version)
        if msg.version < info.required_version:
            reason = f"waiting for weights version {info.required_version}"
            self.link.send(info, NoWork(retry_after_s=NO_WORK_RETRY_S, reason=reason))
            return
        keys, items = self.books.assign(msg.sampler_id, msg.version, msg.max_prompts)
        if not keys:
            self.link.send(info, NoWork(retry_after_s=NO_WORK_RETRY_S, reason="staleness bound"))
            return
        if self.link.send(info, WorkAssignment(items=items, version=self.state.version)):
            self.books.dispatched(keys, msg.sampler_id, msg.version)
        else:  # still in flight unless the failed send already declared the sampler lost
            self.books.give_back(keys)

    def _on_result(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            if self.link.result_sender(msg.sampler_id, version=msg.version, state=msg.state) is not None:
                self.sampler_times = {**self.sampler_times, msg.sampler_id: msg.times}
            return
        if not isinstance(msg, ScreenReport | RolloutGroup | GroupDropped | EvalResult | RewardStats):
            self.link.counters["unknown_sender"] += 1
            return
        if self.link.result_sender(msg.sampler_id) is None:
            return
        if isinstance(msg, RewardStats):  # counts, not progress
            self.books.on_reward_stats(msg)
            return
        self.progress_at = time.monotonic()
        if isinstance(msg, ScreenReport):
            go = self.books.on_screen(msg)
            if go is not None:
                decision = ContinueDecision(prompt_id=msg.prompt_id, epoch=msg.epoch, go=go)
                if not self.link.send_to(msg.sampler_id, decision) and go:
                    # The sampler drops the screen when no answer comes (GroupDropped "no_decision").
                    self.books.reissue((msg.epoch, msg.prompt_id), msg.sampler_id, "decision not sent")
        elif isinstance(msg, RolloutGroup):
            if not self.books.on_group(msg):
                self.link.counters["bad_group"] += 1
        elif isinstance(msg, GroupDropped):
            self.books.on_dropped(msg)
        else:
            finished = self.evals.on_result(msg)
            if finished is not None:
                self._evals.put(finished)

    def _check_liveness(self) -> None:
        limit = self.config.pipeline.sampler_timeout_s
        for info in self.members.silent(limit):
            silent_for = time.monotonic() - info.last_seen
            self._lose(
                info.sampler_id,
                f"silent for {silent_for:.1f} s (pipeline.sampler_timeout_s = {limit:g}; last heartbeat said "
                f"{info.state!r}, version {info.version})",
            )
