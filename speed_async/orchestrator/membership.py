"""Which samplers are members of the run: their process incarnations, liveness and weight-sync state.

A sampler joins with `Hello` (a restarted process joins again under the same sampler id, as a new
incarnation) and is lost when it stays silent for `pipeline.sampler_timeout_s` (its heartbeat thread beats
every `pipeline.heartbeat_s`, also while the engine generates), when a newer process of the same id says
hello, when its connection is gone, or when it does not join a weight-sync group it was asked to join. A
joined sampler gets no work until it holds `required_version` (the weights published when it joined), which
the publisher sends it after re-forming the weight-sync group with it.

The dispatcher thread writes; the publisher thread reads and records formed groups; one lock guards all.
Every change is also a line of run_dir/samplers.jsonl (`joined`, `lost`, `group_formed`, `sync_failed`,
`deferred`), so operators and tests can follow the membership of a run. A live sampler that does not arrive
when a group is formed (busy in a long generation call) is not lost: it is deferred, left out of groups until
it reports back, and the newest weights are then sent to it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS_FILE = "samplers.jsonl"


class EventLog:
    """Append-only JSONL of membership events (thread-safe, line-buffered)."""

    def __init__(self, path: Path | None, *, resume: bool = False) -> None:
        self._lock = threading.Lock()
        self._file = None if path is None else path.open("a" if resume else "w", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        """One event with the wall time `t`."""
        if self._file is None:
            return
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields})
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


@dataclass
class SamplerInfo:
    """What the learner knows of one incarnation of a sampler."""

    sampler_id: int
    identity: bytes
    """ZeroMQ routing identity of its work-channel socket (unique per process)."""
    pid: int
    hostname: str
    incarnation: int
    """0 for the first process with this sampler id, then 1, 2, ... for each restart."""
    required_version: int
    """No work until the sampler reports holding at least this version (the published one when it joined)."""
    version: int = 0
    """The weights it last reported holding."""
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "starting"
    """What it said it was doing in its last heartbeat."""
    alive: bool = True
    in_group: bool = False
    """Member of the current weight-sync generation."""
    sync_failed: bool = False
    """It reported a failed join or receive: the group is re-formed and the weights re-sent."""
    deferred: bool = False
    """Alive but did not arrive when a group was formed (e.g. busy in a long generation call): left out of
    groups until it reports (SyncFailed) that it is ready again."""

    def describe(self) -> str:
        """`sampler 1 (pid 123 on node-1)`."""
        return f"sampler {self.sampler_id} (pid {self.pid} on {self.hostname})"


class Membership:
    """The samplers of a run (thread-safe)."""

    def __init__(self, num_samplers: int, events: EventLog | None = None) -> None:
        self.num_samplers = num_samplers
        self.events = events or EventLog(None)
        self._lock = threading.Lock()
        self._samplers: dict[int, SamplerInfo] = {}
        self._lost: dict[int, str] = {}
        self._none_alive_since: float | None = None
        self.generation = -1
        self.group: tuple[int, ...] = ()

    # ---- changes (dispatcher thread) ---------------------------------------------------------------------
    def join(self, identity: bytes, sampler_id: int, pid: int, hostname: str, required_version: int) -> SamplerInfo:
        """Register a new incarnation of `sampler_id` (the caller has declared an old live one lost first)."""
        with self._lock:
            old = self._samplers.get(sampler_id)
            assert old is None or not old.alive, "declare the live incarnation lost before a new one joins"
            info = SamplerInfo(
                sampler_id=sampler_id,
                identity=identity,
                pid=pid,
                hostname=hostname,
                incarnation=0 if old is None else old.incarnation + 1,
                required_version=required_version,
            )
            self._samplers[sampler_id] = info
            self._lost.pop(sampler_id, None)
            self._none_alive_since = None
        self.events.write(
            "joined",
            sampler=sampler_id,
            pid=pid,
            hostname=hostname,
            incarnation=info.incarnation,
            required_version=required_version,
        )
        return info

    def lose(self, sampler_id: int, reason: str, **details: Any) -> SamplerInfo | None:
        """Declare the live incarnation of `sampler_id` lost; None if it is not alive."""
        with self._lock:
            info = self._samplers.get(sampler_id)
            if info is None or not info.alive:
                return None
            info.alive = False
            info.in_group = False
            self._lost[sampler_id] = f"{info.describe()}: {reason}"
            if not any(s.alive for s in self._samplers.values()):
                self._none_alive_since = time.monotonic()
        self.events.write("lost", sampler=sampler_id, pid=info.pid, reason=reason, **details)
        return info

    def touch(self, sampler_id: int, *, version: int | None = None, state: str | None = None) -> SamplerInfo | None:
        """A message from `sampler_id`: refresh its liveness; None when it is not a live member."""
        with self._lock:
            info = self._samplers.get(sampler_id)
            if info is None or not info.alive:
                return None
            info.last_seen = time.monotonic()
            if version is not None:
                info.version = version
            if state is not None:
                info.state = state
            return info

    def mark_sync_failed(self, sampler_id: int, generation: int, error: str) -> None:
        """`sampler_id` reported a failed join or receive on `generation` (ignored when it is already a member
        of a newer generation: a stale report)."""
        with self._lock:
            info = self._samplers.get(sampler_id)
            if info is None or not info.alive or (info.in_group and generation < self.generation):
                return
            info.sync_failed, info.deferred = True, False
        self.events.write("sync_failed", sampler=sampler_id, generation=generation, error=error)

    def defer(self, sampler_id: int, generation: int) -> None:
        """`sampler_id` did not arrive at generation `generation`: leave it out until it reports back."""
        with self._lock:
            info = self._samplers.get(sampler_id)
            if info is None or not info.alive:
                return
            info.deferred, info.in_group = True, False
        self.events.write("deferred", sampler=sampler_id, generation=generation)

    def restart_clocks(self) -> None:
        """Count every live sampler as heard from now (after the learner itself was stalled)."""
        with self._lock:
            now = time.monotonic()
            for info in self._samplers.values():
                info.last_seen = now

    # ---- weight-sync group (publisher thread) ------------------------------------------------------------
    def group_formed(self, generation: int, members: tuple[int, ...]) -> None:
        """Weight-sync generation `generation` now holds exactly `members` (besides learner rank 0)."""
        with self._lock:
            self.generation, self.group = generation, members
            for sampler_id, info in self._samplers.items():
                info.in_group = info.alive and sampler_id in members
                if info.in_group:
                    info.sync_failed = False
        self.events.write("group_formed", generation=generation, members=list(members))

    def needs_sync(self) -> bool:
        """True when a live sampler (not deferred) is outside the current group or failed a transfer."""
        with self._lock:
            return any(
                s.alive and not s.deferred and (not s.in_group or s.sync_failed) for s in self._samplers.values()
            )

    def syncable_ids(self) -> list[int]:
        """Ids of the live samplers that are not deferred: the members of the next group."""
        with self._lock:
            return [i for i, s in sorted(self._samplers.items()) if s.alive and not s.deferred]

    # ---- queries -----------------------------------------------------------------------------------------
    def get(self, sampler_id: int) -> SamplerInfo | None:
        """The latest incarnation of `sampler_id` (alive or not)."""
        with self._lock:
            return self._samplers.get(sampler_id)

    def live(self) -> list[SamplerInfo]:
        """The live samplers, by id."""
        with self._lock:
            return [s for _, s in sorted(self._samplers.items()) if s.alive]

    def live_ids(self) -> list[int]:
        """Ids of the live samplers, sorted."""
        return [s.sampler_id for s in self.live()]

    def silent(self, limit_s: float) -> list[SamplerInfo]:
        """Live samplers not heard from for more than `limit_s`."""
        now = time.monotonic()
        with self._lock:
            return [s for s in self._samplers.values() if s.alive and now - s.last_seen > limit_s]

    def none_alive_for(self) -> float:
        """Seconds since the last live sampler was lost (0 while one is alive or none has joined yet)."""
        with self._lock:
            since = self._none_alive_since
        return 0.0 if since is None else time.monotonic() - since

    def lost_summary(self) -> str:
        """Why each sampler that is not alive now was lost, for error messages."""
        with self._lock:
            return "; ".join(self._lost[i] for i in sorted(self._lost)) or "none lost"

    def close(self) -> None:
        """Close the event log."""
        self.events.close()
