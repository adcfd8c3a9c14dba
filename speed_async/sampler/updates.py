"""When the sampler loop loads new weights, and what happens to the work in flight then.

`UpdatesMixin` is a base class of `speed_async.sampler.loop.SamplerLoop` and works on the loop's state. An
`UpdateWeights` the dispatcher announced waits in `pending_update` until `_maybe_update` loads it between two
engine steps, per `rollout.weight_update_mode`: `keep` (requests in flight continue under the new weights),
`wait` (`_draining`: no new training requests until those in flight finish), `abort` (they are dropped and their
prompts returned). Evaluations of older weights finish first. Once the weights are loaded, work whose first
request is more than pipeline.max_staleness versions older can never be trained: it is dropped and its prompt
returned, in every mode. The receive itself is `speed_async.sampler.sync.WeightSync`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from speed_async.sampler.wire import dropped_message

if TYPE_CHECKING:
    from speed_async.config import Config
    from speed_async.curriculum.groups import PromptWork
    from speed_async.protocol import Message, UpdateWeights
    from speed_async.sampler.activity import ActivityClock
    from speed_async.sampler.engine import Engine
    from speed_async.sampler.inflight import RequestBook, Stage
    from speed_async.sampler.sync import WeightSync

__all__ = ["UpdatesMixin"]

log = logging.getLogger("speed_async.sampler")


class UpdatesMixin:
    """The sampler loop's weight updates between two engine steps (state: the loop's, below)."""

    config: Config
    sampler_id: int
    engine: Engine
    book: RequestBook
    clock: ActivityClock
    sync: WeightSync
    pending_update: UpdateWeights | None
    eval_items: list[tuple[PromptWork, int]]
    counters: dict[str, int]
    _emit: Callable[[Message], None]  # the loop's send on the results channel (ChannelMixin)

    def _draining(self) -> bool:
        """Mode `wait` with an update pending: no new training requests until those in flight finish."""
        return self.pending_update is not None and self.config.rollout.weight_update_mode == "wait"

    def _maybe_update(self) -> None:
        """Load pending weights between two engine steps, as rollout.weight_update_mode says."""
        update = self.pending_update
        if update is None:
            return
        if any(s.is_eval and s.eval_version < update.version for s in self.book.stages()) or self.eval_items:
            return  # evaluations of older weights finish first
        mode = self.config.rollout.weight_update_mode
        if mode == "wait" and any(not s.is_eval for s in self.book.stages() if s.outstanding):
            return  # draining
        self.pending_update = None
        if mode == "abort":
            self._drop_work(lambda s: bool(s.outstanding), "aborted")
        self.clock.switch("weights")
        in_flight = (self.sampler_id, update.version, mode, self.engine.num_unfinished)
        log.info("sampler %d: loading weights v%d (%s) with %d requests in flight", *in_flight)
        seconds = self.sync.receive(update)
        if seconds is None:
            return
        log.info("sampler %d: weights v%d loaded in %.3f s", self.sampler_id, update.version, seconds)
        # Work whose first request is more than k versions older than these weights can never be trained.
        oldest = update.version - self.config.pipeline.max_staleness
        self._drop_work(lambda s: s.first_version < oldest, "stale_in_flight")

    def _drop_work(self, which: Callable[[Stage], bool], reason: str) -> None:
        """Abort the training stages `which` selects, in the engine and the book; return their prompts."""
        stages, ids = self.book.abort(lambda s: not s.is_eval and which(s))
        self.engine.abort(ids)
        self.counters["aborted_requests"] += len(ids)
        for stage in stages:
            self.counters["returned_prompts"] += 1
            self._emit(dropped_message(self.sampler_id, stage.work, reason, stage.first_version))
