"""What the reward pool counts: every item's outcome, and per data source what was scored and what failed.

Every item lands in exactly one of "scored" (answered by a worker), "timeouts", "too_long", "errors" (the
function raised, or the worker died) or "invalid" (no valid result); "worker_restarts" counts replacement
workers. Items with ``counted`` also enter their data source's `SourceStats` (responses, score sum, failures by
kind, sums of the functions' extra metrics), which `PoolTally.take_sources` hands over and resets. A failure
says whether it is the first of its data source and kind (the pool logs only that one).
"""

from __future__ import annotations

from collections.abc import Mapping

from speed_async.rewards.functions import FAILURE_KINDS
from speed_async.rewards.stats import RewardItem, SourceStats

__all__ = ["COUNTERS", "PoolTally"]

COUNTERS = ("scored", "timeouts", "too_long", "errors", "invalid", "worker_restarts")
"""The pool's counters (`speed_async.rewards.pool.RewardPool.stats`)."""


class PoolTally:
    """The counters of one reward pool since its creation, and its per-source stats since they were last taken.

    Not thread-safe: the pool calls it under its lock.
    """

    def __init__(self) -> None:
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._sources: dict[str, SourceStats] = {}
        self._logged: set[tuple[str, str]] = set()  # (data source, failure kind) already reported

    def count(self, counter: str) -> None:
        """One more of `counter` (in COUNTERS) without a per-source entry: "too_long" or "worker_restarts"."""
        self._counts[counter] += 1

    def scored(self, item: RewardItem, score: float, metrics: Mapping[str, float]) -> None:
        """`item` was scored by its function: `score`, with the function's extra `metrics`."""
        self._counts["scored"] += 1
        stats = self._source(item)
        if stats is not None:
            stats.add(score, metrics)

    def failed(self, item: RewardItem, kind: str) -> bool:
        """`item`'s function failed (`kind` in FAILURE_KINDS): it scores 0.0. Returns whether this is the first
        failure of its data source and kind."""
        assert kind in FAILURE_KINDS, kind
        self._counts["timeouts" if kind == "timeout" else "errors" if kind == "error" else "invalid"] += 1
        stats = self._source(item)
        if stats is not None:
            stats.fail(kind)
        if (item.data_source, kind) in self._logged:
            return False
        self._logged.add((item.data_source, kind))
        return True

    def totals(self) -> dict[str, int]:
        """A copy of the counters (COUNTERS) since creation."""
        return dict(self._counts)

    def take_sources(self) -> dict[str, SourceStats]:
        """Per data source, what was scored of the ``counted`` items since the previous call (then reset)."""
        taken, self._sources = self._sources, {}
        return taken

    def _source(self, item: RewardItem) -> SourceStats | None:
        return self._sources.setdefault(item.data_source, SourceStats()) if item.counted else None
