"""The reward worker process: resolve the scoring functions once, then score items in its main thread.

Protocol on its pipe (see `speed_async.rewards.pool`): it sends ``("ready",)`` or ``("startup_error", text)``;
then for each item ``(function_path, response, ground_truth, extra_json)`` it answers ``("ok", score,
metrics)`` or ``("fail", kind, text)`` (kind ``error``: the function raised, with its traceback; ``invalid``:
it returned no valid result). An empty function path means the default function, called with
``(response, ground_truth)``; any other is called with ``(response, ground_truth, extra)``. None or EOF ends
the worker, and it exits on its own once its parent process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from speed_async.rewards.functions import InvalidReward, check_result, load_function

_ORPHAN_POLL_S = 0.5


def _exit_when_orphaned(parent_pid: int) -> None:
    """Kill this worker once its parent is gone, even while the main thread is stuck in a function."""
    while os.getppid() == parent_pid:
        time.sleep(_ORPHAN_POLL_S)
    os._exit(0)


def _load(default_path: str, paths: tuple[str, ...]) -> dict[str, Callable[..., Any]]:
    """{"": the default function, path: function} for every path; ValueError naming the one that fails."""
    functions = {}
    for key, path in (("", default_path), *((p, p) for p in paths)):
        try:
            functions[key] = load_function(path)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return functions


def worker_main(
    conn: Connection, default_path: str, paths: tuple[str, ...], parent_pid: int, cpus: frozenset[int] | None
) -> None:
    """Entry point of one worker process (on `cpus`, when given, instead of the parent's cores)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    # The parent owns the worker's lifetime: a Ctrl-C in the terminal must not kill workers mid-item.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        functions = _load(default_path, paths)
        # Warm up: Math-Verify builds its parsers on the first call, which can take seconds on a loaded machine
        # and then runs into its own time limit (scoring a correct answer 0.0). Inside startup_timeout_s. The
        # configured functions are not called before their first item.
        functions[""]("\\boxed{1}", "1")
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
        conn.send(_score(functions, *item))


def _score(
    functions: dict[str, Callable[..., Any]], path: str, response: str, ground_truth: str, extra: str
) -> tuple[Any, ...]:
    try:
        value = (
            functions[path](response, ground_truth)
            if not path
            else functions[path](response, ground_truth, json.loads(extra))
        )
        score, metrics = check_result(value)
    except InvalidReward as exc:
        return ("fail", "invalid", str(exc))
    except Exception:
        return ("fail", "error", traceback.format_exc(limit=-8))
    return ("ok", score, metrics)
