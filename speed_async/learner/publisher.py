"""Learner rank 0's weight publisher: pushes each new version to every sampler on the weight-sync group.

Ordering contract (see speed_async.weight_sync): every learner rank has already gathered the full state in
lockstep (`iter_full_state`) after the optimizer step; rank 0 hands that snapshot to this thread, which
  1. announces UpdateWeights(v) to the samplers (through the dispatcher),
  2. broadcasts the buckets (samplers receive between their generation calls),
  3. marks version v published, so the dispatcher paces new work against it.
One publish at a time: `publish` waits for the previous one. Errors surface in the train loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from speed_async.config import Config
from speed_async.weight_sync.broadcast import WeightBroadcaster
from speed_async.weight_sync.buckets import describe, plan_buckets
from speed_async.weight_sync.group import SyncGroup, connect_store

log = logging.getLogger("speed_async.publisher")


class WeightPublisher:
    """Owns the sync group's store (master, started before any sampler connects) and the broadcaster."""

    def __init__(self, config: Config, device: torch.device) -> None:
        self.config = config
        self.device = device.type
        host = config.cluster.bind_host
        port = config.cluster.base_port + 2 if config.cluster.base_port else 0
        self.store = connect_store(host, port, is_master=True, timeout_s=config.pipeline.sync_timeout_s)
        self.master = (host, int(self.store.port))
        self.generation = -1
        self.group: SyncGroup | None = None
        self.broadcaster: WeightBroadcaster | None = None
        self.dispatcher = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_seconds = float("nan")
        self.last_gbps = float("nan")
        self.total_seconds = 0.0

    def attach(self, dispatcher: object) -> None:
        """The dispatcher that relays announcements to the samplers."""
        self.dispatcher = dispatcher

    def form_group(self, generation: int) -> None:
        """Ask the live samplers to join generation `generation` and join it as rank 0 (blocks until all do)."""
        assert self.dispatcher is not None
        timeout = self.config.pipeline.sync_timeout_s
        num_samplers = len(self.dispatcher.live_samplers())
        self.dispatcher.join_sync_group(generation, timeout)
        if self.group is not None:
            self.group.close()
        self.group = SyncGroup(
            self.store,
            rank=0,
            world_size=num_samplers + 1,
            device=self.device,
            timeout_s=timeout,
            generation=generation,
        )
        self.generation = generation
        self.broadcaster = WeightBroadcaster(self.group)
        log.info("weight-sync group generation %d formed with %d samplers", generation, num_samplers)

    def publish(
        self, version: int, named: list[tuple[str, torch.Tensor]], after: Callable[[], None] | None = None
    ) -> None:
        """Start publishing `version` in the background (after the previous publish has finished)."""
        self.wait()
        # `named` comes from iter_full_state, which yields fresh copies: the next step cannot change them.
        self._thread = threading.Thread(
            target=self._publish, args=(version, named, after), name=f"publish-v{version}", daemon=True
        )
        self._thread.start()

    def _publish(self, version: int, named: list[tuple[str, torch.Tensor]], after: Callable[[], None] | None) -> None:
        try:
            assert self.broadcaster is not None and self.dispatcher is not None
            buckets = plan_buckets([describe(n, t) for n, t in named], self.broadcaster.bucket_bytes)
            self.dispatcher.announce_update(version, self.generation, len(buckets))
            stats = self.broadcaster.send(named, version)
            self.dispatcher.mark_published(version)
            self.last_seconds, self.last_gbps = stats.seconds, stats.gbps
            self.total_seconds += stats.seconds
            if after is not None:
                after()
        except BaseException as err:
            log.exception("publishing version %d failed", version)
            self._error = err

    def wait(self) -> None:
        """Block until the publish in flight (if any) is done; re-raise its error here."""
        if self._thread is not None:
            self._thread.join(timeout=self.config.pipeline.sync_timeout_s * 2)
            if self._thread.is_alive():
                raise TimeoutError(
                    f"publishing weights did not finish within {self.config.pipeline.sync_timeout_s * 2:.0f} s"
                )
            self._thread = None
        if self._error is not None:
            raise RuntimeError(f"weight publishing failed: {self._error}") from self._error

    def close(self) -> None:
        """Release the group."""
        if self.group is not None:
            self.group.close()
            self.group = None
