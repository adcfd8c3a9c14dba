"""Reward scoring with a real per-item time limit: a small pool of persistent worker processes.

```
  parent (submit / poll, score_batch)                  worker i (spawned; main thread scores)
  ------------------------------------------------     ----------------------------------------
  start: spawn, wait for ("ready",)  <= startup_timeout_s  <- resolve score_fn, score one warm-up item,
                                                               send ("ready",)
  loop:  send (response, ground_truth) to an idle worker    -> score_fn(...) in the main thread
         wait(connections, until the earliest deadline)     <- ("ok", score) | ("error", message)
         no answer within timeout_s: SIGKILL, spawn a replacement, item scores 0.0
  close: send None, join (then SIGKILL)                     -> exit; also exits on EOF or when
                                                               its parent process is gone
```

`submit` queues items and returns tickets at once; `poll` hands back the scores finished so far (the sampler
scores responses while its engine generates); `score_batch` is submit-and-wait. Each worker holds at most one
item, so the time limit is exact per item. Items longer than
``max_chars`` score 0.0 without being sent. Workers are started with the "spawn" context: the parent
may hold threads and ZeroMQ sockets, which must not be forked. Spawn re-imports the parent's
``__main__`` module in each worker, so entry points keep heavy work behind
``if __name__ == "__main__":``.
"""

import atexit
import contextlib
import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

DEFAULT_SCORE_FN = "speed_async.rewards.math_verify_reward:score_math"
_ORPHAN_POLL_S = 0.5
_JOIN_TIMEOUT_S = 2.0


def _resolve_score_fn(path: str) -> Callable[[str, str], float]:
    """Import ``"package.module:function"`` and return the function."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Kill this worker once its parent is gone, even while the main thread is stuck in a score_fn."""
    while os.getppid() == parent_pid:
        time.sleep(_ORPHAN_POLL_S)
    os._exit(0)


def _worker_main(conn: Connection, score_fn_path: str, parent_pid: int, cpus: frozenset[int] | None) -> None:
    """Worker process: resolve the scoring function once, then score items until None or EOF (on `cpus`, when
    given, instead of the parent's cores)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    # The parent owns the worker's lifetime: a Ctrl-C in the terminal must not kill workers mid-item.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        score_fn = _resolve_score_fn(score_fn_path)
        # Warm up: Math-Verify builds its parsers on the first call, which can take seconds on a loaded machine
        # and then runs into its own time limit (scoring a correct answer 0.0). Inside startup_timeout_s.
        score_fn("\\boxed{1}", "1")
    except Exception as exc:
        conn.send(("startup_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            reply = ("ok", float(score_fn(*item)))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


@dataclass
class _Worker:
    """Parent-side handle of one worker slot."""

    slot: int
    process: BaseProcess
    conn: Connection
    deadline: float
    ready: bool = False
    ticket: int | None = None  # ticket of the item in flight, if any

    def name(self) -> str:
        return f"reward worker {self.slot} (pid {self.process.pid})"

    def waiting(self) -> bool:
        """Whether the parent waits on this worker: for its ready message or for a score."""
        return not self.ready or self.ticket is not None


class WorkerStartupError(RuntimeError):
    """A reward worker failed to start (import error, early exit, or no ready message in time)."""


def _check_item(index: int, item: object) -> None:
    """Raise ValueError unless ``item`` is a ``(response, ground_truth)`` tuple of two str."""
    if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
        raise ValueError(f"items[{index}] must be a (response, ground_truth) tuple of two str, got {item!r:.100}")


class RewardPool:
    """Persistent worker processes that score ``(response, ground_truth)`` pairs with a real time limit.

    Args:
        num_workers: number of worker processes (>= 1).
        timeout_s: per-item limit; a worker that has not answered by then is killed (SIGKILL) and
            replaced, and the item scores 0.0.
        max_chars: responses longer than this score 0.0 without being parsed.
        score_fn: ``"package.module:function"`` of a ``(response, ground_truth) -> float`` function,
            imported once in each worker (default: Math-Verify, :func:`score_math`).
        startup_timeout_s: limit for a worker to import ``score_fn`` and report ready; past it, or if a
            worker cannot import ``score_fn``, :class:`WorkerStartupError` names the worker.
        cpus: cores the workers run on (default: the caller's).

    Stats (:meth:`stats`): every item lands in exactly one of "scored" (answered by a worker),
    "timeouts", "too_long" or "errors" (score_fn raised, or the worker died); "worker_restarts" counts
    replacement workers. Methods are serialised by a lock; use the pool as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        max_chars: int = 20000,
        score_fn: str = DEFAULT_SCORE_FN,
        startup_timeout_s: float = 60.0,
        cpus: set[int] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} is invalid: allowed >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} is invalid: allowed > 0")
        if max_chars < 1:
            raise ValueError(f"max_chars={max_chars} is invalid: allowed >= 1")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s={startup_timeout_s} is invalid: allowed > 0")
        module_name, colon, attr = score_fn.partition(":")
        if not (module_name and colon and attr):
            raise ValueError(f"score_fn={score_fn!r} is invalid: allowed 'package.module:function'")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.score_fn = score_fn
        self.startup_timeout_s = startup_timeout_s
        self.cpus = frozenset(cpus) if cpus else None
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self._stats = dict.fromkeys(("scored", "timeouts", "too_long", "errors", "worker_restarts"), 0)
        self._workers: list[_Worker] = []
        self._pending: deque[tuple[int, tuple[str, str]]] = deque()
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

    def submit(self, items: Sequence[tuple[str, str]]) -> list[int]:
        """Queue ``(response, ground_truth)`` pairs for scoring without waiting; returns one ticket per item.

        Scores come back from :meth:`poll` (or :meth:`take`) keyed by ticket. Raises ValueError naming the
        index of an item that is not a tuple of two str (nothing of the call is queued then), RuntimeError
        if the pool is closed.
        """
        for index, item in enumerate(items):
            _check_item(index, item)
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.submit called after close()")
            tickets = []
            for item in items:
                ticket = self._next_ticket
                self._next_ticket += 1
                tickets.append(ticket)
                if len(item[0]) > self.max_chars:
                    self._stats["too_long"] += 1
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

    def score_batch(self, items: Sequence[tuple[str, str]]) -> list[float]:
        """Score ``(response, ground_truth)`` pairs in parallel and wait; scores come back in input order.

        Raises:
            ValueError: if an item is not a tuple of two str (names its index).
            RuntimeError: if the pool is closed.
            WorkerStartupError: if a replacement worker fails to start. Replacements (after a timeout or
                a crash) start in the background, so the call that next waits on one raises this.

        If scoring is interrupted (by that error or any other, e.g. KeyboardInterrupt) the pool is closed.
        """
        return self.take(self.submit(items))

    def wait_for_answer(self, timeout_s: float) -> None:
        """Block until a worker that holds an item has answered (then `poll` returns at once), at most `timeout_s`.
        The pool's lock is not held meanwhile, so `submit` and `poll` from other threads proceed."""
        with self._lock:
            conns = [w.conn for w in self._workers if w.ticket is not None]
        if not conns:
            time.sleep(timeout_s)
            return
        with contextlib.suppress(OSError, ValueError):  # a worker replaced meanwhile: its connection closed
            wait(conns, timeout_s)

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
        """Counters since creation: scored, timeouts, too_long, errors, worker_restarts."""
        with self._lock:
            return dict(self._stats)

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
        for worker in self._workers:
            if worker.waiting():  # starting or scoring: it would not read an exit request soon
                worker.process.kill()
            else:
                with contextlib.suppress(OSError):  # already dead: reaped below
                    worker.conn.send(None)
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            self._stop(worker)

    def _spawn(self, slot: int) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self.score_fn, os.getpid(), self.cpus),
            name=f"reward-worker-{slot}",
            daemon=True,
        )
        process.start()
        child_conn.close()  # so that the parent reads EOF when the worker dies
        return _Worker(slot, process, parent_conn, deadline=time.monotonic() + self.startup_timeout_s)

    def _stop(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(_JOIN_TIMEOUT_S)
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._stop(worker)
        self._workers[worker.slot] = self._spawn(worker.slot)
        self._stats["worker_restarts"] += 1

    def _send(self, worker: _Worker) -> None:
        ticket, item = self._pending.popleft()
        try:
            worker.conn.send(item)
        except OSError:
            # The worker died while idle: no item was lost; retry this one on its replacement.
            logger.warning("%s died while idle; replacing it", worker.name())
            self._pending.appendleft((ticket, item))
            self._replace(worker)
            return
        worker.ticket = ticket
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

    def _on_message(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except EOFError:
            if not worker.ready:
                self._stop(worker)
                raise WorkerStartupError(
                    f"{worker.name()} exited during startup (exit code {worker.process.exitcode})"
                ) from None
            assert worker.ticket is not None
            logger.warning("%s died while scoring item %d; replacing it", worker.name(), worker.ticket)
            self._stats["errors"] += 1
            self._done[worker.ticket] = 0.0
            self._replace(worker)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "startup_error":
            self._stop(worker)
            raise WorkerStartupError(f"{worker.name()} could not load score_fn={self.score_fn!r}: {message[1]}")
        elif kind == "ok":
            assert worker.ticket is not None
            self._done[worker.ticket] = message[1]
            self._stats["scored"] += 1
            worker.ticket = None
        else:
            assert kind == "error" and worker.ticket is not None, message
            logger.warning("%s: score_fn raised on item %d: %s", worker.name(), worker.ticket, message[1])
            self._stats["errors"] += 1
            self._done[worker.ticket] = 0.0
            worker.ticket = None

    def _on_deadline(self, worker: _Worker) -> None:
        if not worker.ready:
            self._stop(worker)
            raise WorkerStartupError(
                f"{worker.name()} did not report ready within startup_timeout_s={self.startup_timeout_s} s "
                f"(importing score_fn={self.score_fn!r})"
            )
        assert worker.ticket is not None
        logger.warning(
            "%s: no score for item %d within timeout_s=%s; killing and replacing it",
            worker.name(),
            worker.ticket,
            self.timeout_s,
        )
        self._done[worker.ticket] = 0.0
        self._stats["timeouts"] += 1
        self._replace(worker)


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


def score_batch(items: Sequence[tuple[str, str]]) -> list[float]:
    """Score ``(response, ground_truth)`` pairs with Math-Verify on the default single-worker pool."""
    return _get_default_pool().score_batch(items)
