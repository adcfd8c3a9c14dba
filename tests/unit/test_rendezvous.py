"""The weight-sync membership barrier on a real TCPStore (threads play the ranks): all arrive, a rank that never
arrives is named, an abandoned generation releases its waiters at once, and rank 0 can give up early."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from speed_async.weight_sync.group import SyncTimeoutError
from speed_async.weight_sync.rendezvous import RendezvousError, abandon_generation, join_generation

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store() -> dist.TCPStore:
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)


def _in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except Exception as err:  # handed to the test
            out.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_every_rank_arrives(store: dist.TCPStore) -> None:
    threads = [_in_thread(lambda r=r: join_generation(store, 0, r, 3, 5.0)) for r in (1, 2)]
    assert join_generation(store, 0, 0, 3, 5.0) < 5.0
    for thread, out in threads:
        thread.join()
        assert isinstance(out[0], float)


def test_a_missing_rank_is_named_after_the_timeout(store: dist.TCPStore) -> None:
    thread, _ = _in_thread(lambda: join_generation(store, 1, 1, 3, 0.5))
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=r"generation 1 \(rank 0 of 3\): rank\(s\) \[2\] did not arrive") as info:
        join_generation(store, 1, 0, 3, 1.0)
    assert 0.9 < time.monotonic() - start < 3
    assert info.value.missing == [2] and info.value.reason == "timeout"
    assert isinstance(info.value, SyncTimeoutError)
    thread.join()


def test_an_abandoned_generation_releases_its_waiters_at_once(store: dist.TCPStore) -> None:
    thread, out = _in_thread(lambda: join_generation(store, 2, 1, 3, 30.0))
    time.sleep(0.3)
    start = time.monotonic()
    abandon_generation(store, 2, "sampler 2 lost")
    thread.join(timeout=5)
    assert time.monotonic() - start < 2
    assert isinstance(out[0], RendezvousError) and out[0].reason == "sampler 2 lost"
    with pytest.raises(RendezvousError, match="abandoned by the learner"):  # late arrivals too
        join_generation(store, 2, 2, 3, 30.0)


def test_rank_0_gives_up_when_told(store: dist.TCPStore) -> None:
    calls = []

    def lost() -> str | None:
        calls.append(1)
        return "sampler 1 lost meanwhile" if len(calls) > 3 else None

    with pytest.raises(RendezvousError, match="given up \\(sampler 1 lost meanwhile\\)"):
        join_generation(store, 3, 0, 2, 30.0, abort_if=lost)


def test_bad_arguments(store: dist.TCPStore) -> None:
    with pytest.raises(ValueError, match="rank=3"):
        join_generation(store, 4, 3, 3, 1.0)
    with pytest.raises(ValueError, match="timeout_s=0"):
        join_generation(store, 4, 0, 3, 0)
