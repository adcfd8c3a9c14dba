"""The sampler's heartbeat thread: proves the process is alive while its main loop is busy.

A generation call, a scoring batch or a weight reload can take longer than the learner's liveness timeout, and
the main loop cannot send anything meanwhile. This thread sends a `Heartbeat` every `interval_s` on its own
PUSH socket to the learner's results endpoint (ZeroMQ sockets belong to one thread), carrying what the main
loop is doing and for how long, so that the learner can tell a busy sampler from a dead one, and say what a
stopped one was doing, and the main loop's time per activity so far (`times()`, see
`speed_async.sampler.activity`). A process that is stopped (SIGSTOP) or killed stops beating, and the learner declares
it lost after `pipeline.sampler_timeout_s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from speed_async.protocol import Heartbeat
from speed_async.transport import Context, PushSocket, TransportError

log = logging.getLogger("speed_async.sampler")


class HeartbeatThread:
    """Sends `Heartbeat(sampler_id, *status())` every `interval_s` until `stop()`."""

    def __init__(
        self,
        ctx: Context,
        endpoint: str,
        sampler_id: int,
        interval_s: float,
        status: Callable[[], tuple[int, int, str]],
        *,
        key: bytes | None,
        max_bytes: int,
        times: Callable[[], np.ndarray],
    ) -> None:
        """`status()` returns (policy version, pending work items, state text), `times()` the seconds per
        activity (float64, SAMPLER_ACTIVITIES order); both are called from this thread."""
        self.ctx, self.endpoint, self.sampler_id = ctx, endpoint, sampler_id
        self.interval_s, self.status, self.times = interval_s, status, times
        self.key, self.max_bytes = key, max_bytes
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{sampler_id}", daemon=True)

    def start(self) -> None:
        """Start beating."""
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and close the socket (waits at most a few intervals)."""
        self._stop.set()
        self._thread.join(timeout=3 * self.interval_s + 1)

    def _run(self) -> None:
        push = PushSocket(self.ctx, self.endpoint, key=self.key, max_bytes=self.max_bytes)
        blocked = False
        try:
            while not self._stop.wait(self.interval_s):
                version, pending, state = self.status()
                msg = Heartbeat(
                    sampler_id=self.sampler_id,
                    version=version,
                    num_pending=pending,
                    state=state[:200],
                    times=self.times(),
                )
                try:
                    push.send(msg, timeout_s=self.interval_s)
                    self.sent += 1
                    blocked = False
                except TransportError as err:
                    if not blocked:  # the main loop reports an unresponsive learner; say it once here
                        log.warning("sampler %d: heartbeat not sent: %s", self.sampler_id, err)
                    blocked = True
        finally:
            push.close()
