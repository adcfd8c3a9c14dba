"""The membership barrier of a weight-sync group generation, run before its process group is built.

Every member (learner rank 0 and each sampler named in `JoinSyncGroup`) calls `join_generation` on the sync
store; it returns once all `world_size` ranks have arrived. Unlike the process group's own connect, it can be
given up early and it says who is missing:

- rank 0 passes `abort_if`, which returns a reason as soon as a member is known to be lost (the dispatcher
  declared it dead), and `abandon_generation` marks a generation given up, so that members still waiting in
  its barrier leave at once instead of at their timeout;
- on timeout the error names the ranks that never arrived (`RendezvousError.missing`), so the learner can
  drop exactly those samplers and form the next generation.

Keys live under their own prefix, apart from the process group's, and a generation is never reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch.distributed as dist

from speed_async.weight_sync.group import SyncTimeoutError

PREFIX = "speed_async/weight_sync/members"
POLL_S = 0.05


class RendezvousError(SyncTimeoutError):
    """The barrier of a generation failed: `missing` ranks never arrived, or it was given up (`reason`)."""

    def __init__(self, message: str, *, missing: list[int], reason: str) -> None:
        super().__init__(message)
        self.missing = missing
        self.reason = reason


def _key(generation: int, name: str) -> str:
    return f"{PREFIX}/gen{generation}/{name}"


def join_generation(
    store: dist.Store,
    generation: int,
    rank: int,
    world_size: int,
    timeout_s: float,
    abort_if: Callable[[], str | None] | None = None,
) -> float:
    """Announce `rank` in `generation` and wait until all `world_size` ranks have; returns the seconds waited.

    Raises RendezvousError when `timeout_s` passes (naming the missing ranks), when the generation has been
    abandoned (`abandon_generation`), or when `abort_if()` returns a reason.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not allowed; it must be in [0, {world_size})")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} is not allowed; it must be > 0")
    start = time.monotonic()
    where = f"weight-sync group generation {generation} (rank {rank} of {world_size})"
    store.set(_key(generation, f"arrived/{rank}"), b"1")
    keys = [_key(generation, f"arrived/{r}") for r in range(world_size)]
    abandoned = _key(generation, "abandoned")
    while True:
        if store.check([abandoned]):
            reason = store.get(abandoned).decode(errors="replace")
            raise RendezvousError(f"{where}: abandoned by the learner ({reason})", missing=[], reason=reason)
        if abort_if is not None and (reason := abort_if()):
            raise RendezvousError(f"{where}: given up ({reason})", missing=[], reason=reason)
        if store.check(keys):
            return time.monotonic() - start
        if time.monotonic() - start >= timeout_s:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise RendezvousError(
                f"{where}: rank(s) {missing} did not arrive within {timeout_s:g} s",
                missing=missing,
                reason="timeout",
            )
        time.sleep(POLL_S)


def abandon_generation(store: dist.Store, generation: int, reason: str) -> None:
    """Mark `generation` given up: members waiting in (or arriving at) its barrier leave with `reason`."""
    store.set(_key(generation, "abandoned"), reason.encode())


def is_abandoned(store: dist.Store, generation: int) -> str | None:
    """Why `generation` was abandoned, or None while it is not."""
    key = _key(generation, "abandoned")
    return store.get(key).decode(errors="replace") if store.check([key]) else None
