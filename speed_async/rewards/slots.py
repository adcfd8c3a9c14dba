"""The reward pool's worker slots: the parent's side of the worker protocol (`speed_async.rewards.worker`).

Each slot of a `speed_async.rewards.pool.RewardPool` holds a `WorkerHandle`: the process, the parent's end of
its pipe, the item in flight and the deadline of what the parent waits for (its ready message, or a score).
`spawn_worker` starts a worker process with the "spawn" context, `stop_worker` kills one that is still alive
and closes its pipe, `stop_workers` ends them all when the pool closes. `WorkerSlots`, a base class of
RewardPool, holds the conversation: hand an idle worker an item, wait for answers until the earliest deadline,
record each score or failure, and replace a worker that died or ran past its deadline (SIGKILL; the item
scores 0.0). A worker that cannot start raises `WorkerStartupError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from speed_async.rewards.functions import FAILURE_KINDS
from speed_async.rewards.stats import RewardItem
from speed_async.rewards.tally import PoolTally
from speed_async.rewards.worker import worker_main

__all__ = [
    "JOIN_TIMEOUT_S",
    "WorkerHandle",
    "WorkerSlots",
    "WorkerStartupError",
    "spawn_worker",
    "stop_worker",
    "stop_workers",
]

logger = logging.getLogger("speed_async.rewards.pool")  # the pool's warnings keep the pool's logger name

JOIN_TIMEOUT_S = 2.0
"""How long stopping waits for worker processes to exit (then kills them)."""


class WorkerStartupError(RuntimeError):
    """A reward worker failed to start (import error, early exit, or no ready message in time)."""


@dataclass
class WorkerHandle:
    """Parent-side handle of one worker slot."""

    slot: int
    process: BaseProcess
    conn: Connection
    deadline: float
    ready: bool = False
    ticket: int | None = None  # ticket of the item in flight, if any
    item: RewardItem | None = None  # the item in flight, if any

    def name(self) -> str:
        """How log lines and errors name the worker: its slot and process id."""
        return f"reward worker {self.slot} (pid {self.process.pid})"

    def waiting(self) -> bool:
        """Whether the parent waits on this worker: for its ready message or for a score."""
        return not self.ready or self.ticket is not None


def spawn_worker(
    context: SpawnContext,
    slot: int,
    score_fn: str,
    functions: Mapping[str, str],
    cpus: frozenset[int] | None,
    startup_timeout_s: float,
) -> WorkerHandle:
    """Start the worker of `slot` (default function `score_fn`, and every function of `functions`, on `cpus`);
    it has `startup_timeout_s` to report ready."""
    parent_conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(
        target=worker_main,
        args=(child_conn, score_fn, tuple(sorted(set(functions.values()))), os.getpid(), cpus),
        name=f"reward-worker-{slot}",
        daemon=True,
    )
    process.start()
    child_conn.close()  # so that the parent reads EOF when the worker dies
    return WorkerHandle(slot, process, parent_conn, deadline=time.monotonic() + startup_timeout_s)


def stop_worker(worker: WorkerHandle) -> None:
    """Kill the worker if it is still alive (and reap it), then close the parent's end of its pipe."""
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join(JOIN_TIMEOUT_S)
    worker.conn.close()


def stop_workers(workers: Sequence[WorkerHandle]) -> None:
    """Stop every worker: idle ones are asked to exit (and killed after a grace period), others killed."""
    for worker in workers:
        if worker.waiting():  # starting or scoring: it would not read an exit request soon
            worker.process.kill()
        else:
            with contextlib.suppress(OSError):  # already dead: reaped below
                worker.conn.send(None)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        stop_worker(worker)


class WorkerSlots:
    """The pool's conversation with its workers (state: the pool's, below; called under the pool's lock)."""

    timeout_s: float
    score_fn: str
    functions: dict[str, str]
    startup_timeout_s: float
    cpus: frozenset[int] | None
    _context: SpawnContext
    _tally: PoolTally
    _workers: list[WorkerHandle]
    _pending: deque[tuple[int, RewardItem]]
    _done: dict[int, float]

    def _spawn(self, slot: int) -> WorkerHandle:
        return spawn_worker(self._context, slot, self.score_fn, self.functions, self.cpus, self.startup_timeout_s)

    def _replace(self, worker: WorkerHandle) -> None:
        stop_worker(worker)
        self._workers[worker.slot] = self._spawn(worker.slot)
        self._tally.count("worker_restarts")

    def _send(self, worker: WorkerHandle) -> None:
        ticket, item = self._pending.popleft()
        path = self.functions.get(item.data_source, "")
        try:
            worker.conn.send((path, item.response, item.ground_truth, item.extra))
        except OSError:
            # The worker died while idle: no item was lost; retry this one on its replacement.
            logger.warning("%s died while idle; replacing it", worker.name())
            self._pending.appendleft((ticket, item))
            self._replace(worker)
            return
        worker.ticket, worker.item = ticket, item
        worker.deadline = time.monotonic() + self.timeout_s

    def _wait_once(self, timeout_s: float | None) -> None:
        """Wait for messages from busy or starting workers until the earliest deadline (and at most
        `timeout_s`), handle them, and act on the deadlines that passed."""
        waiting = [w for w in self._workers if w.waiting()]
        assert waiting, "nothing to wait for"
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        if timeout_s is not None:
            timeout = min(timeout, timeout_s)
        for conn in wait([w.conn for w in waiting], timeout):
            self._on_message(next(w for w in waiting if w.conn is conn))
        now = time.monotonic()
        for worker in waiting:
            # Skip workers replaced or answered above: their deadline no longer applies.
            if self._workers[worker.slot] is worker and worker.waiting() and now >= worker.deadline:
                self._on_deadline(worker)

    def _on_message(self, worker: WorkerHandle) -> None:
        try:
            message = worker.conn.recv()
        except EOFError:
            if not worker.ready:
                stop_worker(worker)
                raise WorkerStartupError(
                    f"{worker.name()} exited during startup (exit code {worker.process.exitcode})"
                ) from None
            self._failed(worker, "error", f"the worker died (exit code {worker.process.exitcode}); replacing it")
            self._replace(worker)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "startup_error":
            stop_worker(worker)
            raise WorkerStartupError(f"{worker.name()} could not load a scoring function: {message[1]}")
        elif kind == "ok":
            assert worker.ticket is not None and worker.item is not None
            _, score, metrics = message
            self._done[worker.ticket] = score
            self._tally.scored(worker.item, score, metrics)
            worker.ticket, worker.item = None, None
        else:
            assert kind == "fail" and worker.ticket is not None, message
            self._failed(worker, message[1], message[2])

    def _on_deadline(self, worker: WorkerHandle) -> None:
        if not worker.ready:
            stop_worker(worker)
            raise WorkerStartupError(
                f"{worker.name()} did not report ready within startup_timeout_s={self.startup_timeout_s} s "
                f"(importing score_fn={self.score_fn!r} and {sorted(set(self.functions.values()))})"
            )
        self._failed(worker, "timeout", "no score in time; the worker is killed and replaced")
        self._replace(worker)

    def _failed(self, worker: WorkerHandle, kind: str, text: str) -> None:
        """The item in `worker` failed (`kind`): it scores 0.0, counted; the first of its source and kind logged."""
        assert worker.ticket is not None and worker.item is not None and kind in FAILURE_KINDS
        item = worker.item
        self._done[worker.ticket] = 0.0
        function = self.functions.get(item.data_source, self.score_fn)
        if self._tally.failed(item, kind):
            logger.warning(
                "%s: %s for data source %r (item %d; it scores 0, later ones of this kind and source are only "
                "counted): %s", worker.name(), {"error": f"{function} raised", "invalid": f"{function} returned no "
                "valid result", "timeout": f"{function} ran past timeout_s={self.timeout_s}"}[kind],
                item.data_source, worker.ticket, text.rstrip(),
            )  # fmt: skip
        worker.ticket, worker.item = None, None
