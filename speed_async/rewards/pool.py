"""Reward scoring with a real per-item time limit: a small pool of persistent worker processes.

```
  parent (submit / poll, score_batch)                  worker i (spawned; main thread scores, worker.py)
  ------------------------------------------------     ----------------------------------------
  start: spawn, wait for ("ready",)  <= startup_timeout_s  <- resolve every function, warm up the default,
                                                               send ("ready",)
  loop:  send (function, response, truth, extra) to an      -> the data source's function in the main thread
         idle worker
         wait(connections, until the earliest deadline)     <- ("ok", score, metrics) | ("fail", kind, text)
         no answer within timeout_s: SIGKILL, spawn a replacement, item scores 0.0
  close: send None, join (then SIGKILL)                     -> exit; also exits on EOF or when
                                                               its parent process is gone
```

`submit` queues items and returns tickets at once; `poll` hands back the scores finished so far (the sampler
scores responses while its engine generates); `score_batch` is submit-and-wait. Each worker holds at most one
item, so the time limit is exact per item. Items longer than
``max_chars`` score 0.0 without being sent. An item's data source picks its function (`functions`, else the
default `score_fn`); a function that raises, returns no valid result (`speed_async.rewards.functions`) or runs
past the limit scores 0.0 and is counted per source (`take_source_stats`), the first failure of each kind per
source logged with its traceback. Workers are started with the "spawn" context: the parent
may hold threads and ZeroMQ sockets, which must not be forked. Spawn re-imports the parent's
``__main__`` module in each worker, so entry points keep heavy work behind
``if __name__ == "__main__":``.

This module holds what callers see: the queue, the tickets and the default pool. The conversation with the
workers (handles, spawn, answers, deadlines, replacements) is `speed_async.rewards.slots`, the counters and
per-source stats `speed_async.rewards.tally`.
"""

import atexit
import contextlib
import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Self

from speed_async.rewards.slots import WorkerHandle, WorkerSlots, stop_workers
from speed_async.rewards.slots import WorkerStartupError as WorkerStartupError  # re-exported: it was defined here
from speed_async.rewards.stats import RewardItem, SourceStats
from speed_async.rewards.tally import PoolTally

logger = logging.getLogger(__name__)  # the pool's; its worker slots (`speed_async.rewards.slots`) log under it

DEFAULT_SCORE_FN = "speed_async.rewards.math_verify_reward:score_math"


def _as_item(index: int, item: object) -> RewardItem:
    """``item`` as a RewardItem (a ``(response, ground_truth)`` tuple of two str is one with no data source);
    ValueError naming its index otherwise."""
    if isinstance(item, RewardItem):
        return item
    if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
        raise ValueError(
            f"items[{index}] must be a RewardItem or a (response, ground_truth) tuple of two str, got {item!r:.100}"
        )
    return RewardItem(item[0], item[1])


class RewardPool(WorkerSlots):
    """Persistent worker processes that score ``(response, ground_truth)`` pairs with a real time limit.

    Args:
        num_workers: number of worker processes (>= 1).
        timeout_s: per-item limit; a worker that has not answered by then is killed (SIGKILL) and
            replaced, and the item scores 0.0.
        max_chars: responses longer than this score 0.0 without being parsed.
        score_fn: ``"package.module:function"`` of a ``(response, ground_truth) -> float`` function,
            imported once in each worker (default: Math-Verify, :func:`score_math`), for items whose data
            source `functions` does not name.
        functions: data source -> ``"package.module:function"`` of a ``(response, ground_truth, extra)``
            function returning a float or a dict with ``score`` and extra metrics (see
            `speed_async.rewards.functions`).
        startup_timeout_s: limit for a worker to import its functions and report ready; past it, or if a
            worker cannot import one, :class:`WorkerStartupError` names the worker (and the function).
        cpus: cores the workers run on (default: the caller's).

    Stats (:meth:`stats`): every item lands in exactly one of "scored" (answered by a worker),
    "timeouts", "too_long", "errors" (the function raised, or the worker died) or "invalid" (no valid result);
    "worker_restarts" counts replacement workers. Per data source (:meth:`take_source_stats`, items with
    ``counted``): responses, score sum, failures by kind, sums of the functions' extra metrics. Methods are
    serialised by a lock; use the pool as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        max_chars: int = 20000,
        score_fn: str = DEFAULT_SCORE_FN,
        startup_timeout_s: float = 60.0,
        cpus: set[int] | None = None,
        functions: Mapping[str, str] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} is invalid: allowed >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} is invalid: allowed > 0")
        if max_chars < 1:
            raise ValueError(f"max_chars={max_chars} is invalid: allowed >= 1")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s={startup_timeout_s} is invalid: allowed > 0")
        for name, path in (("score_fn", score_fn), *((f"functions[{k!r}]", v) for k, v in (functions or {}).items())):
            module_name, colon, attr = path.partition(":")
            if not (module_name and colon and attr):
                raise ValueError(f"{name}={path!r} is invalid: allowed 'package.module:function'")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.score_fn = score_fn
        self.functions = dict(functions or {})
        self.startup_timeout_s = startup_timeout_s
        self.cpus = frozenset(cpus) if cpus else None
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self._tally = PoolTally()  # the counters, per-source stats, failures already logged
        self._workers: list[WorkerHandle] = []
        self._pending: deque[tuple[int, RewardItem]] = deque()
        self._done: dict[int, float] = {}
        self._next_ticket = 0
        try:
            for slot in range(num_workers):
                self._workers.append(self._spawn(slot))
            while not all(w.ready for w in self._workers):
                self._wait_once(None)
        except BaseException:
            self._shutdown()
            raise

    def submit(self, items: Sequence[RewardItem | tuple[str, str]]) -> list[int]:
        """Queue items (RewardItems, or ``(response, ground_truth)`` pairs) for scoring without waiting; returns
        one ticket per item.

        Scores come back from :meth:`poll` (or :meth:`take`) keyed by ticket. Raises ValueError naming the
        index of an item that is neither (nothing of the call is queued then), RuntimeError if the pool is
        closed.
        """
        items = [_as_item(index, item) for index, item in enumerate(items)]
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.submit called after close()")
            tickets = []
            for item in items:
                ticket = self._next_ticket
                self._next_ticket += 1
                tickets.append(ticket)
                if len(item.response) > self.max_chars:
                    self._tally.count("too_long")
                    self._done[ticket] = 0.0
                else:
                    self._pending.append((ticket, item))
            self._guarded(self._dispatch)
            return tickets

    def poll(self, timeout_s: float = 0.0) -> dict[int, float]:
        """Scores finished since the last call, by ticket; waits up to `timeout_s` for the first one when none
        is finished yet. Never waits longer than the earliest per-item deadline that is due meanwhile (a hung
        worker is then killed and its item scores 0.0)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.poll called after close()")
            self._guarded(lambda: self._pump(0.0 if self._done else timeout_s))
            done, self._done = self._done, {}
            return done

    def take(self, tickets: Sequence[int]) -> list[float]:
        """Wait for the scores of `tickets` (from :meth:`submit`) and return them in that order; scores of other
        tickets finished meanwhile stay for :meth:`poll`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.take called after close()")
            assert all(0 <= t < self._next_ticket for t in tickets), "tickets come from submit()"
            while not all(t in self._done for t in tickets):
                self._guarded(lambda: self._pump(None))  # waits: some of `tickets` are still being scored
            return [self._done.pop(t) for t in tickets]

    def score_batch(self, items: Sequence[RewardItem | tuple[str, str]]) -> list[float]:
        """Score items (RewardItems or ``(response, ground_truth)`` pairs) in parallel and wait; scores come back
        in input order.

        Raises:
            ValueError: if an item is neither (names its index).
            RuntimeError: if the pool is closed.
            WorkerStartupError: if a replacement worker fails to start. Replacements (after a timeout or
                a crash) start in the background, so the call that next waits on one raises this.

        If scoring is interrupted (by that error or any other, e.g. KeyboardInterrupt) the pool is closed.
        """
        return self.take(self.submit(items))

    def wait_for_answer(self, timeout_s: float, also: Sequence[Connection] = ()) -> None:
        """Block until a worker that holds an item has answered (then `poll` returns at once), or one of the
        connections `also` has something to read, at most `timeout_s`. The pool's lock is not held meanwhile, so
        `submit` and `poll` from other threads proceed."""
        with self._lock:
            conns = [w.conn for w in self._workers if w.ticket is not None]
        if not conns and not also:
            time.sleep(timeout_s)
            return
        with contextlib.suppress(OSError, ValueError):  # a worker replaced meanwhile: its connection closed
            wait([*conns, *also], timeout_s)

    @property
    def num_unfinished(self) -> int:
        """Items submitted and not yet scored (queued or inside a worker)."""
        return len(self._pending) + sum(1 for w in self._workers if w.ticket is not None)

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run `action`; if it is interrupted, close the pool (workers may hold items: it cannot be reused)."""
        try:
            action()
        except BaseException:
            self._shutdown()
            raise

    def _dispatch(self) -> None:
        """Hand queued items to idle ready workers."""
        for worker in self._workers:
            if self._pending and worker.ready and worker.ticket is None:
                self._send(worker)

    def _pump(self, timeout_s: float | None) -> None:
        """Dispatch, wait once for answers (at most `timeout_s`, None: until the earliest deadline), dispatch
        again."""
        self._dispatch()
        if any(w.waiting() for w in self._workers):
            self._wait_once(timeout_s)
            self._dispatch()

    def stats(self) -> dict[str, int]:
        """Counters since creation: scored, timeouts, too_long, errors, invalid, worker_restarts."""
        with self._lock:
            return self._tally.totals()

    def take_source_stats(self) -> dict[str, SourceStats]:
        """Per data source, what was scored of the ``counted`` items since the previous call (then reset)."""
        with self._lock:
            return self._tally.take_sources()

    @property
    def closed(self) -> bool:
        """Whether the pool is closed (by :meth:`close`, or after an interrupted :meth:`score_batch`)."""
        return self._closed

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers, by slot."""
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    def close(self) -> None:
        """Stop the workers: idle ones are asked to exit (and killed after a grace period), others killed."""
        with self._lock:
            self._shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop_workers(self._workers)


_default_pool: RewardPool | None = None
_default_pool_lock = threading.Lock()


def _get_default_pool() -> RewardPool:
    """The process-wide single-worker Math-Verify pool, created on first use (again if it was closed)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool.closed:
            _default_pool = RewardPool(num_workers=1)
            atexit.register(_default_pool.close)
        return _default_pool


def math_reward(response: str, ground_truth: str) -> float:
    """Score one response with Math-Verify (1.0 or 0.0) under the default pool's real time limit."""
    return _get_default_pool().score_batch([(response, ground_truth)])[0]


def score_batch(items: Sequence[RewardItem | tuple[str, str]]) -> list[float]:
    """Score ``(response, ground_truth)`` pairs with Math-Verify on the default single-worker pool."""
    return _get_default_pool().score_batch(items)
