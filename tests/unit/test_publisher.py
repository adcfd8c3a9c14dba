"""WeightPublisher.wait: the train loop waits for the previous version's broadcast, but not for one that nobody
is left to receive (a gloo broadcast to a stopped sampler returns only at pipeline.sync_timeout_s)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from speed_async.config import load_config
from speed_async.learner.publisher import PublishError, WeightPublisher, _Job


class _Members:
    """The two calls of the dispatcher's membership that wait() makes."""

    def __init__(self, none_alive_for: float) -> None:
        self.lost_for = none_alive_for

    def none_alive_for(self) -> float:
        return self.lost_for

    def lost_summary(self) -> str:
        return "sampler 0 (pid 1234 on host): silent for 8.0 s"


class _Dispatcher:
    def __init__(self, none_alive_for: float) -> None:
        self.members = _Members(none_alive_for)
        self.waiting_for = ""


def _publisher(none_alive_for: float) -> WeightPublisher:
    config = load_config(None, ["pipeline.rejoin_timeout_s=2", "pipeline.sync_timeout_s=60"])
    publisher = WeightPublisher(config, torch.device("cpu"))
    publisher.attach(_Dispatcher(none_alive_for))
    publisher._job = _Job(3, [], None)  # a broadcast in flight (no thread: it never finishes by itself)
    return publisher


def test_wait_gives_up_on_a_broadcast_when_no_sampler_is_alive() -> None:
    publisher = _publisher(none_alive_for=2.5)
    start = time.monotonic()
    with pytest.raises(PublishError) as err:
        publisher.wait()
    assert time.monotonic() - start < 5, "not after the broadcast's own timeout"
    message = str(err.value)
    assert "no sampler has been alive for 2 s (pipeline.rejoin_timeout_s = 2)" in message, message
    assert "weights version 3 to reach the samplers" in message and "sampler 0 (pid 1234 on host)" in message


def test_wait_waits_for_the_broadcast_while_a_sampler_may_come_back() -> None:
    publisher = _publisher(none_alive_for=1.0)  # lost, but less than rejoin_timeout_s ago

    def finish() -> None:
        time.sleep(1.5)
        with publisher._cv:
            publisher._job = None
            publisher._cv.notify_all()

    threading.Thread(target=finish, daemon=True).start()
    start = time.monotonic()
    publisher.wait()
    assert 1.4 < time.monotonic() - start < 10
