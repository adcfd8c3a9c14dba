"""Learner rank 0's weight publisher: keeps every live sampler on the newest weights, through membership changes.

Ordering contract (see speed_async.weight_sync): every learner rank has already gathered the full state in
lockstep (`iter_full_state`) after the optimizer step; rank 0 hands that snapshot to this publisher's thread,
which for each version
  1. forms a new weight-sync generation first if the live samplers differ from the group's members,
  2. announces UpdateWeights(v) to the members (through the dispatcher),
  3. broadcasts the buckets (samplers receive between their generation calls),
  4. marks version v published, so the dispatcher paces new work against it.
One publish at a time: `publish` waits for the previous one. Errors surface in the train loop.

Membership changes (the same thread, so nothing else runs on the group meanwhile):
- A sampler that joins (a restart, or one the learner had lost) or reports a failed transfer makes the
  thread form a new generation with the live samplers and send the newest published weights again, at once:
  a joiner gets no work before it holds them, and the learner may be waiting for its work.
- A lost sampler leaves the group at the next publish (the next generation is formed without it).
- A generation whose forming fails (a member lost meanwhile, or one that does not arrive in time: it is
  deferred, i.e. left out until it reports back, see speed_async.orchestrator.membership) or whose broadcast fails
  (a member died or was busy during it) is abandoned and the next one formed, up to `MAX_ATTEMPTS` times per
  version. The weights of the newest version are kept (one host copy) for this.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from speed_async.config import Config
from speed_async.weight_sync.broadcast import WeightBroadcaster
from speed_async.weight_sync.buckets import describe, plan_buckets
from speed_async.weight_sync.group import SyncGroup, SyncTimeoutError
from speed_async.weight_sync.rendezvous import RendezvousError, abandon_generation, join_generation

log = logging.getLogger("speed_async.publisher")
MAX_ATTEMPTS = 5
"""Generations tried per version before publishing fails."""
IDLE_POLL_S = 0.2


@dataclass
class _Job:
    version: int
    named: list[tuple[str, torch.Tensor]]
    after: Callable[[], None] | None


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to `host` (`*` means every interface) and `port` (0: any free one)."""
    address = "0.0.0.0" if host == "*" else host
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(256)
    return sock


class PublishError(RuntimeError):
    """Publishing a version failed (after MAX_ATTEMPTS generations) or did not finish in time."""


class WeightPublisher:
    """Owns the sync group's store (master, started before any sampler connects), the group and its thread."""

    def __init__(self, config: Config, device: torch.device) -> None:
        self.config = config
        self.device = device.type
        self.timeout_s = config.pipeline.sync_timeout_s
        host = config.cluster.bind_host
        port = config.cluster.base_port + 2 if config.cluster.base_port else 0
        # The store listens on a socket bound here, to cluster.bind_host only: a TCPStore left to bind by itself
        # listens on every interface, whatever host it is given.
        self._listener = _listen(host, port)
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        self.store = dist.TCPStore(
            host,
            self._listener.getsockname()[1],
            None,
            True,
            timedelta(seconds=self.timeout_s),
            wait_for_workers=False,
            master_listen_fd=self._listener.fileno(),
        )
        self.master = (host, int(self.store.port))
        self.generation = -1
        self.members: tuple[int, ...] = ()
        self.group: SyncGroup | None = None
        self.broadcaster: WeightBroadcaster | None = None
        self.dispatcher = None
        self._latest: _Job | None = None
        self._job: _Job | None = None
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_seconds = float("nan")
        self.last_gbps = float("nan")
        self.total_seconds = 0.0
        self.resyncs = 0
        """Re-sends of the newest weights after a membership change (joins, failed transfers)."""

    def attach(self, dispatcher: object) -> None:
        """The dispatcher that relays announcements to the samplers and knows who is alive."""
        self.dispatcher = dispatcher

    def start(self) -> None:
        """Start the publisher thread (after the dispatcher)."""
        assert self.dispatcher is not None, "attach() a dispatcher first"
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    @property
    def publish_timeout_s(self) -> float:
        """The longest one version may take to reach the samplers: MAX_ATTEMPTS generations, each forming
        (up to 2 x sync_timeout_s) and broadcasting (up to sync_timeout_s per transfer, a few of them)."""
        return MAX_ATTEMPTS * 6 * self.timeout_s

    # ---- train-loop side ---------------------------------------------------------------------------------
    def publish(
        self, version: int, named: list[tuple[str, torch.Tensor]], after: Callable[[], None] | None = None
    ) -> None:
        """Publish `version` in the background, after the previous publish has finished. `named` comes from
        iter_full_state, which yields fresh copies: the next step cannot change them."""
        self.wait()
        if self.dispatcher is not None:
            self.dispatcher.waiting_for = "the train step"
        with self._cv:
            self._job = _Job(version, named, after)
            self._cv.notify_all()

    def wait(self) -> None:
        """Block until the publish in flight (if any) is done; re-raise its error here."""
        deadline = time.monotonic() + self.publish_timeout_s
        job = self._job
        if job is not None and self.dispatcher is not None:  # named when a sampler is lost meanwhile
            self.dispatcher.waiting_for = f"weights version {job.version} to reach the samplers"
        rejoin_s = self.config.pipeline.rejoin_timeout_s
        with self._cv:
            while self._job is not None and self._error is None:
                if time.monotonic() >= deadline:
                    raise PublishError(
                        f"publishing weights version {self._job.version} did not finish within "
                        f"{self.publish_timeout_s:.0f} s (generation {self.generation}, members {self.members})"
                    )
                members = getattr(self.dispatcher, "members", None)
                if members is not None and (lost_for := members.none_alive_for()) > rejoin_s:
                    # A broadcast to a stopped sampler returns only at the group's timeout (sync_timeout_s):
                    # with nobody left to receive it, stop waiting (the run checkpoints and exits without it).
                    raise PublishError(
                        f"no sampler has been alive for {lost_for:.0f} s (pipeline.rejoin_timeout_s = {rejoin_s:g}) "
                        f"while the learner waited for weights version {self._job.version} to reach the samplers: "
                        f"{members.lost_summary()}"
                    )
                self._cv.wait(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
        self.check()

    def check(self) -> None:
        """Raise the publisher thread's error, if it failed."""
        if self._error is not None:
            raise PublishError(f"weight publishing failed: {self._error}") from self._error

    def close(self, wait_s: float | None = None) -> bool:
        """Stop the thread and release the group; False if the thread is still busy after `wait_s` (default
        3 x sync_timeout_s). A gloo broadcast cannot be interrupted: one to a stopped sampler returns only at
        the group's timeout, and the group is then left to the process's exit."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s * 3 if wait_s is None else wait_s)
            if self._thread.is_alive():
                return False
        self._drop_group("the learner is closing")  # the store's socket stays open until the process ends
        return True

    # ---- publisher thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self.dispatcher is not None
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._job is not None or self._closing, timeout=IDLE_POLL_S)
                    if self._closing:
                        return
                    job = self._job
                if job is not None:
                    self._latest = job
                    self._deliver(job)
                    with self._cv:
                        self._job = None
                        self._cv.notify_all()
                    if job.after is not None:
                        job.after()
                elif self._latest is not None and self.dispatcher.members.needs_sync():
                    self.resyncs += 1
                    log.info("membership changed: sending version %d again", self._latest.version)
                    self._deliver(self._latest)
        except BaseException as err:
            log.exception("the weight publisher failed")
            with self._cv:
                self._error = err
                self._cv.notify_all()

    def _deliver(self, job: _Job) -> None:
        """Get `job` to every live sampler, re-forming the group as needed (see the module docstring)."""
        errors = []
        for _ in range(MAX_ATTEMPTS):
            members = tuple(self.dispatcher.members.syncable_ids())
            if not members:
                # Nobody to send to; whoever joins or reports back later gets these weights then.
                self._drop_group("no live sampler")
                self.dispatcher.mark_published(job.version)
                return
            try:
                if self.group is None or members != self.members or self.dispatcher.members.needs_sync():
                    self._form(members)
                buckets = plan_buckets([describe(n, t) for n, t in job.named], self.broadcaster.bucket_bytes)
                self.dispatcher.announce_update(job.version, self.generation, len(buckets), members)
                stats = self.broadcaster.send(job.named, job.version)
            except (SyncTimeoutError, RuntimeError) as err:
                errors.append(f"generation {self.generation}: {err}")
                log.warning("weights version %d on generation %d failed: %s", job.version, self.generation, err)
                self._drop_group(f"failed: {err}")
                continue
            self.dispatcher.mark_published(job.version)
            self.last_seconds, self.last_gbps = stats.seconds, stats.gbps
            self.total_seconds += stats.seconds
            return
        raise PublishError(f"could not publish version {job.version} in {MAX_ATTEMPTS} generations: {errors}")

    def _form(self, members: tuple[int, ...]) -> None:
        """Form the next generation with `members`; RendezvousError (members declared lost) if it fails."""
        self._drop_group("superseded")
        generation = self.generation + 1
        self.generation, self.members = generation, members
        self.dispatcher.join_sync_group(generation, members, self.timeout_s)

        def lost_meanwhile() -> str | None:
            gone = set(members) - set(self.dispatcher.live_samplers())
            return f"sampler(s) {sorted(gone)} lost meanwhile" if gone else None

        start = time.monotonic()
        try:
            join_generation(self.store, generation, 0, len(members) + 1, 2 * self.timeout_s, lost_meanwhile)
        except RendezvousError as err:
            # Alive but not there (busy): left out until it reports back; a dead one is lost by its heartbeats.
            for rank in err.missing:
                if rank > 0:
                    self.dispatcher.members.defer(members[rank - 1], generation)
            raise
        self.group = SyncGroup(
            self.store,
            rank=0,
            world_size=len(members) + 1,
            device=self.device,
            timeout_s=self.timeout_s,
            generation=generation,
        )
        self.broadcaster = WeightBroadcaster(self.group)
        self.dispatcher.members.group_formed(generation, members)
        log.info(
            "weight-sync group generation %d formed with samplers %s in %.2f s",
            generation,
            list(members),
            time.monotonic() - start,
        )

    def _drop_group(self, reason: str) -> None:
        """Abandon the current generation (members still waiting in its barrier leave at once)."""
        if self.generation >= 0:
            abandon_generation(self.store, self.generation, reason)
        if self.group is not None:
            self.group.close()
        self.group, self.broadcaster, self.members = None, None, ()
