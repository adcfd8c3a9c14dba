"""The dispatcher: learner rank 0's thread that owns the sockets, the curriculum state and the ledger.

```
  samplers ──Hello/WorkRequest/Heartbeat/SyncDone/ ──► ROUTER ─┐
             SyncFailed                                        │  dispatcher thread (this module)
  samplers ──ScreenReport/RolloutGroup/GroupDropped/ ► PULL ───┤   DispatchState: cursor, in flight, ready FIFO
             EvalResult/Heartbeat (heartbeat thread)           │   Ledger, Membership (liveness), EvalBook
  train loop ──commands (batch for step s, consumed or  ──────►│
               cancelled, update v, published v, eval v, stop) │
  publisher  ──join generation g ─────────────────────────────►│
  train loop ◄──batches, eval accuracies, errors ──────────────┘
```
The train loop never touches a socket: it asks for the batch of step s and waits on a queue with a timeout,
so receiving and dispatching never stall a train step. What bounds the lag: `DispatchState.room` paces the
hand-out and `DispatchState.take_batch` checks step - version <= k for every group; both sit in the training
books (`speed_async.orchestrator.intake`), which also write the ledger.

Faults: a sampler silent for `pipeline.sampler_timeout_s` (or replaced by a new process, or unreachable) is
declared lost: its in-flight prompts are re-issued first (ledger `reissued`) and the publisher re-forms the
weight-sync group without it. A (re)joining sampler gets no work before it holds the weights published when
it joined. A control message from a sampler the learner no longer counts is answered with `Rejoin`. With no
sampler alive for `pipeline.rejoin_timeout_s`, `next_batch` raises `SamplersLost` and the learner stops
after a checkpoint. Invalid frames and messages from unknown senders are dropped and counted
(`transport/rejected/*` in metrics.jsonl); no message can stop the dispatcher. The handling of each sampler
message is `speed_async.orchestrator.inbox`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speed_async.config import Config
from speed_async.curriculum.dispatch import DispatchState, Key
from speed_async.curriculum.train_group import TrainGroup
from speed_async.data.prepare import Prompt
from speed_async.orchestrator.evaluation import EvalBook, EvalOutcome
from speed_async.orchestrator.inbox import InboxMixin
from speed_async.orchestrator.intake import TrainingBooks
from speed_async.orchestrator.ledger import Ledger
from speed_async.orchestrator.sampler_link import SamplerLink
from speed_async.protocol import (
    Shutdown,
    UpdateWeights,
)

log = logging.getLogger("speed_async.dispatcher")


class DispatcherError(RuntimeError):
    """Raised in the train loop when the dispatcher thread failed or a wait timed out."""


class SamplersLost(DispatcherError):
    """No sampler has been alive for `pipeline.rejoin_timeout_s`."""


class StopRequested(DispatcherError):
    """The launcher asked the learner to stop (e.g. a sampler exhausted its restarts)."""


class Dispatcher(InboxMixin):
    """Runs in a daemon thread on learner rank 0; the train loop talks to it through thread-safe methods; what it
    does with each sampler message is `InboxMixin`'s (`speed_async.orchestrator.inbox`)."""

    def __init__(
        self,
        config: Config,
        train_prompts: Sequence[Prompt],
        eval_prompts: Sequence[Prompt],
        ledger: Ledger,
        *,
        key: bytes | None,
        sync_master: tuple[str, int],
        run_dir: Path | None = None,
        resume: bool = False,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.sync_master = sync_master
        self.books = TrainingBooks(config, train_prompts, ledger)
        self.link = SamplerLink(config, key=key, on_gone=self._lose, run_dir=run_dir, resume=resume)
        self.members = self.link.members
        self.work_endpoint, self.results_endpoint = self.link.work_endpoint, self.link.results_endpoint
        self.evals = EvalBook(eval_prompts, config.trainer.eval_n)
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._batches: queue.Queue[tuple[int, list[TrainGroup]]] = queue.Queue()
        self._evals: queue.Queue[EvalOutcome] = queue.Queue()
        self._snapshots: queue.Queue[dict[str, Any]] = queue.Queue()
        self.min_work_version = 0  # a resumed run hands out no work to samplers below the restored version
        self._wanted_step: int | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.waiting_for = "the samplers to connect"
        """What the train loop waits for now (named when a sampler is lost)."""
        self.progress_at = time.monotonic()
        """Last time a result from a sampler was accepted."""
        # Gauges for the train loop; each is replaced as a whole by the dispatcher thread, never mutated.
        self.step_stats: dict[str, float] = {"weight_sync/reload_seconds": float("nan")}
        self.sampler_times: dict[int, np.ndarray] = {}
        """Each sampler's seconds per activity (SAMPLER_ACTIVITIES) from its latest heartbeat."""
        self.transport_metrics: dict[str, float] = self.link.transport_metrics()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    @property
    def state(self) -> DispatchState[TrainGroup]:
        """The hand-out state (read it from the train loop only for gauges)."""
        return self.books.state

    def source_metrics(self) -> dict[str, float]:
        """The per-data-source fields of a step record (speed_async.orchestrator.sources); thread-safe."""
        return self.books.sources.metrics(self.config.curriculum.mode)

    @property
    def counters(self) -> dict[str, int]:
        """Response counters of the training books."""
        return self.books.counters

    # ---- train-loop and publisher side (thread-safe) -----------------------------------------------------
    def start(self) -> None:
        """Start the thread (sockets are already bound)."""
        self._thread.start()

    def _check(self) -> None:
        if self._error is not None:
            raise DispatcherError(f"dispatcher thread failed: {self._error!r}") from self._error

    def wait_for_samplers(self, timeout_s: float) -> None:
        """Block until every configured sampler said Hello; the error names the missing ones."""
        deadline = time.monotonic() + timeout_s
        want = self.config.cluster.num_samplers
        while len(self.members.live_ids()) < want:
            self._check()
            if time.monotonic() > deadline:
                missing = sorted(set(range(want)) - set(self.members.live_ids()))
                raise DispatcherError(
                    f"samplers {missing} did not say hello at {self.work_endpoint} within {timeout_s:.0f} s "
                    "(pipeline.startup_timeout_s)"
                )
            time.sleep(0.05)

    def next_batch(
        self, step: int, *, no_progress_s: float, rejoin_timeout_s: float, stop_check: Callable[[], str | None]
    ) -> list[TrainGroup]:
        """The groups of RL step `step`. Raises SamplersLost when no sampler has been alive for
        `rejoin_timeout_s`, StopRequested when `stop_check()` returns a reason, and DispatcherError when live
        samplers delivered nothing for `no_progress_s`; in each case the step is given up (`cancel_batch`)."""
        ready = self.config.data.train_batch_size
        self.waiting_for = f"the batch of step {step}"
        self._commands.put(("batch", step))
        start = time.monotonic()
        try:
            while True:
                self._check()
                try:
                    got_step, groups = self._batches.get(timeout=0.1)
                except queue.Empty:
                    pass
                else:
                    assert got_step == step, (got_step, step)
                    self._commands.put(("consumed", step))
                    return groups
                error: DispatcherError | None = None
                if (reason := stop_check()) is not None:
                    error = StopRequested(f"stop requested: {reason}")
                elif (lost_for := self.members.none_alive_for()) > rejoin_timeout_s:
                    error = SamplersLost(
                        f"no sampler has been alive for {lost_for:.0f} s (pipeline.rejoin_timeout_s = "
                        f"{rejoin_timeout_s:g}) while the learner waited for the batch of step {step}: "
                        f"{self.members.lost_summary()}"
                    )
                elif time.monotonic() - max(self.progress_at, start) > no_progress_s and self.members.live_ids():
                    error = DispatcherError(
                        f"no batch for step {step}: samplers {self.members.live_ids()} delivered no result for "
                        f"{no_progress_s:.0f} s (pipeline.progress_timeout_s; {len(self.state.ready)} of {ready} "
                        f"usable groups ready, {len(self.state.in_flight)} prompts in flight)"
                    )
                if error is not None:
                    self.cancel_batch(step)
                    raise error
        finally:
            self.waiting_for = "the train step"

    def cancel_batch(self, step: int, timeout_s: float = 10.0) -> None:
        """Give up step `step`: a batch already taken for it goes back to the ready FIFO untrained."""
        done = threading.Event()
        self._commands.put(("cancel", step, done))
        if not done.wait(timeout_s):
            self._check()
            raise DispatcherError(f"the dispatcher thread did not cancel step {step} within {timeout_s:.0f} s")
        while not self._batches.empty():
            self._batches.get_nowait()

    def announce_update(self, version: int, generation: int, num_buckets: int, members: Sequence[int]) -> None:
        """Tell `members` that weights `version` follow on sync group `generation` (before broadcasting)."""
        self._commands.put(("update", version, generation, num_buckets, tuple(members)))

    def mark_published(self, version: int) -> None:
        """Every member of the sync group now holds weights `version`."""
        self._commands.put(("published", version))

    def request_eval(self, version: int) -> None:
        """Evaluate the held-out prompts on weights `version` (spread over the samplers)."""
        self._commands.put(("eval", version))

    def poll_eval(self, timeout_s: float = 0.0) -> EvalOutcome | None:
        """A finished evaluation (its accuracy None for an abandoned one), or None if none finished yet."""
        self._check()
        try:
            return self._evals.get(timeout=timeout_s) if timeout_s > 0 else self._evals.get_nowait()
        except queue.Empty:
            return None

    def join_sync_group(self, generation: int, members: Sequence[int], timeout_s: float) -> None:
        """Ask `members` (ranks 1.. in this order) to join weight-sync group `generation`."""
        self._commands.put(("join", generation, tuple(members), timeout_s))

    def live_samplers(self) -> list[int]:
        """Ids of the samplers currently considered alive."""
        return self.members.live_ids()

    def snapshot(self, timeout_s: float) -> dict[str, Any]:
        """A consistent checkpoint snapshot, taken inside the dispatcher thread: `dispatch`
        (`DispatchState.state_dict()`), `ready` (the groups of the ready FIFO, in order), `counters` and
        `ledger_offset` (ledger.jsonl's size at that moment)."""
        self._commands.put(("snapshot",))
        deadline = time.monotonic() + timeout_s
        while True:
            self._check()
            try:
                return self._snapshots.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise DispatcherError(f"the dispatcher thread took no snapshot within {timeout_s:.0f} s") from None

    def restore(
        self, dispatch: dict[str, Any], ready: list[TrainGroup], counters: dict[str, int], version: int
    ) -> list[Key]:
        """Load a snapshot before `start()`; no work goes to a sampler below `version` (the restored weights).
        Returns the keys that were in flight: they are handed out again first (ledger `reissued`)."""
        assert not self._thread.is_alive(), "restore() before start()"
        self.min_work_version = version
        return self.books.restore(dispatch, ready, counters)

    def stop(self, reason: str) -> None:
        """Tell the samplers to stop, then end the thread."""
        self._commands.put(("stop", reason))
        self._thread.join(timeout=10)
        self.link.close()

    # ---- dispatcher thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            last = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last > self.config.pipeline.sampler_timeout_s / 2:
                    # This thread (the whole learner) did not run for a while: that says nothing of the samplers.
                    log.warning("the dispatcher thread was stalled for %.1f s; sampler clocks restarted", now - last)
                    self.members.restart_clocks()
                last = now
                self._serve_commands()
                got = self._serve_sockets()
                self._check_liveness()
                if not got:
                    time.sleep(0.002)
        except BaseException as err:  # surfaced to the train loop by _check()
            log.exception("dispatcher thread failed")
            self._error = err

    def _serve_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            kind = cmd[0]
            if kind == "batch":
                self._wanted_step = cmd[1]
            elif kind == "consumed":
                self.books.consumed(cmd[1])
            elif kind == "cancel":
                self._wanted_step = None
                self.books.cancel(cmd[1])
                cmd[2].set()
            elif kind == "update":
                _, version, generation, buckets, members = cmd
                msg = UpdateWeights(version=version, generation=generation, num_buckets=buckets)
                for sampler_id in members:
                    self.link.send_to(sampler_id, msg)
            elif kind == "published":
                self.state.published(cmd[1])
            elif kind == "eval":
                for sampler_id, assignment in self.evals.assignments(cmd[1], self.members.live_ids()):
                    self.link.send_to(sampler_id, assignment)
            elif kind == "join":
                _, generation, members, timeout_s = cmd
                self.link.send_join(generation, members, self.sync_master, timeout_s)
            elif kind == "snapshot":
                self._snapshots.put(self.books.snapshot())
            elif kind == "stop":
                for info in self.members.live():
                    self.link.send(info, Shutdown(reason=cmd[1]))
                self._stop.set()
        self._try_batch()

    def _lose(self, sampler_id: int, reason: str) -> None:
        """Declare a live sampler lost: re-issue its in-flight prompts first, abandon its evaluations."""
        in_flight = sum(1 for f in self.state.in_flight.values() if f.sampler_id == sampler_id)
        info = self.members.lose(sampler_id, reason, in_flight=in_flight, waiting_for=self.waiting_for)
        if info is None:
            return
        lost = self.books.sampler_lost(sampler_id)
        for version in self.evals.sampler_lost(sampler_id):
            self._evals.put(EvalOutcome(version, None))
        what = (info.describe(), reason, lost, self.waiting_for, self.members.live_ids())
        log.error("%s lost: %s; %d in-flight prompts re-issued; the learner was waiting for %s; live: %s", *what)

    def _try_batch(self) -> None:
        step = self._wanted_step
        if step is None:
            return
        groups = self.books.take_batch(step)
        if groups is not None:
            self._wanted_step = None
            self._batches.put((step, groups))
