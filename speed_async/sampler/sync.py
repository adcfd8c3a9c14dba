"""The sampler's side of the weight-sync group: joining a generation, receiving a version, failures.

A failed join or receive is reported (`SyncFailed`) and, after a failed receive, the engine's weights count as
incomplete: the sampler generates nothing until the learner has re-formed the group and sent complete weights
again (bounded: `LearnerUnresponsive` after a while); MAX_SYNC_FAILURES counted failures in a row end the
process. The sampler loop decides when a receive happens (between two engine steps, see
`speed_async.sampler.updates`); this object only does it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from speed_async.config import Config
from speed_async.protocol import JoinSyncGroup, Message, SyncDone, SyncFailed, UpdateWeights

log = logging.getLogger("speed_async.sampler")
MAX_SYNC_FAILURES = 5
"""Consecutive failed weight-sync joins or receives before the sampler gives up (exits with an error)."""


class LearnerUnresponsive(TimeoutError):
    """The learner did not answer or take results within pipeline.request_timeout_s (the message says what)."""


class WeightSync:
    """Membership of one engine in the learner's weight-sync group, and the state of its weights."""

    def __init__(self, config: Config, sampler_id: int, engine: object, device: str, send: Callable[[Message], None]):
        self.config, self.sampler_id, self.engine, self.device = config, sampler_id, engine, device
        self._send = send
        self.generation: int | None = None
        """The weight-sync generation this engine is in (None: in none)."""
        self.weights_ok = True
        """False after a failed receive: possibly half-loaded weights, generate nothing."""
        self._bad_since = 0.0
        self._failures = 0
        self._store: tuple[tuple[str, int], object] | None = None  # TCPStore client of the learner's sync store

    def join(self, msg: JoinSyncGroup) -> None:
        """Join weight-sync generation `msg.generation`: the membership barrier, then the process group."""
        from speed_async.weight_sync.group import connect_store
        from speed_async.weight_sync.rendezvous import RendezvousError, join_generation

        self.generation = None
        try:
            if self._store is None or self._store[0] != (msg.master_addr, msg.master_port):
                store = connect_store(msg.master_addr, msg.master_port, is_master=False, timeout_s=msg.timeout_s)
                self._store = ((msg.master_addr, msg.master_port), store)
            join_generation(self._store[1], msg.generation, msg.rank, msg.world_size, 2 * msg.timeout_s)
            backend = "nccl" if self.device == "cuda" else "gloo"
            self.engine.init_weight_sync(
                msg.master_addr,
                msg.master_port,
                msg.rank,
                msg.world_size,
                backend,
                msg.timeout_s,
                generation=msg.generation,
            )
        except RendezvousError as err:  # reported, so that a sampler left out meanwhile is taken in again
            self._failed(msg.generation, err, count=err.reason == "timeout")
            return
        except Exception as err:  # a failed join is reported; the learner forms a new group
            self._failed(msg.generation, err)
            return
        self.generation = msg.generation

    def receive(self, update: UpdateWeights) -> float | None:
        """Receive and load weights `update.version`; its seconds, or None when it failed (reported)."""
        from speed_async.weight_sync.rendezvous import is_abandoned

        if self._store is not None and (reason := is_abandoned(self._store[1], update.generation)):
            # The learner gave this transfer up while this engine was busy: nothing will come; say so.
            self.generation = None
            self._failed(update.generation, f"generation abandoned before the transfer ({reason})", count=False)
            return None
        try:
            seconds = self.engine.receive_weights(update.version)
        except Exception as err:  # the reload may be partial: generate nothing until a full one
            if self.weights_ok:
                self.weights_ok, self._bad_since = False, time.monotonic()
            self._failed(update.generation, err)
            return None
        self.weights_ok, self._failures = True, 0
        self._send(SyncDone(sampler_id=self.sampler_id, version=update.version, seconds=seconds))
        return seconds

    def leave(self) -> None:
        """Forget the current generation (the learner lost this sampler; it says hello again)."""
        self.generation = None

    def check_wait(self) -> None:
        """Incomplete weights are re-sent once the learner has re-formed the group; bound that wait."""
        pipeline = self.config.pipeline
        limit = 2 * (2 * pipeline.sync_timeout_s + pipeline.sampler_timeout_s)
        if not self.weights_ok and time.monotonic() - self._bad_since > limit:
            raise LearnerUnresponsive(
                f"sampler {self.sampler_id}: the learner is unresponsive: it did not re-send the weights within "
                f"{limit:g} s after a failed receive (2 x (2 x pipeline.sync_timeout_s + pipeline.sampler_timeout_s))"
            )

    def _failed(self, generation: int, err: BaseException | str, count: bool = True) -> None:
        """Report a failed join or receive; give up after MAX_SYNC_FAILURES counted ones in a row."""
        self._failures += int(count)
        log.warning("sampler %d: weight sync on generation %d failed: %s", self.sampler_id, generation, err)
        if self._failures >= MAX_SYNC_FAILURES:
            raise RuntimeError(f"sampler {self.sampler_id}: {self._failures} failed weight syncs in a row")
        self.generation = None
        version = self.engine.version
        self._send(SyncFailed(sampler_id=self.sampler_id, generation=generation, version=version, error=str(err)[:500]))
