"""Where a sampler's wall-clock time goes: every second of its main loop charged to one of SAMPLER_ACTIVITIES.

The main loop says what it does next (`switch`); the time since the last switch goes to what it did before.
An engine step that ran training and evaluation sequences together is split between the two by their share of
the sequences in flight (`split`). The heartbeat thread reads `snapshot()` (totals so far, the current
activity's running time included) and sends it to the learner, which lays the samplers' time beside each RL
step (`step/sampler<i>/<activity>` in metrics.jsonl).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np

from speed_async.protocol import SAMPLER_ACTIVITIES

_INDEX = {name: i for i, name in enumerate(SAMPLER_ACTIVITIES)}


class ActivityClock:
    """Cumulative seconds per activity; `switch` and `split` from the main loop, `snapshot` from any thread."""

    def __init__(self, activity: str = "idle_work") -> None:
        self._totals = np.zeros(len(SAMPLER_ACTIVITIES), dtype=np.float64)
        self._current = _INDEX[activity]
        self._since = time.perf_counter()
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        """The activity being timed now."""
        return SAMPLER_ACTIVITIES[self._current]

    def switch(self, activity: str) -> float:
        """Charge the time since the last switch to the current activity, then time `activity`; returns the
        seconds charged."""
        index = _INDEX[activity]
        with self._lock:
            now = time.perf_counter()
            elapsed = now - self._since
            self._totals[self._current] += elapsed
            self._current, self._since = index, now
        return elapsed

    def split(self, weights: Mapping[str, float]) -> float:
        """Charge the time since the last switch to `weights`' activities in proportion (e.g. the sequences of
        each kind in an engine step), keep timing the current activity; returns the seconds charged."""
        total = sum(weights.values())
        with self._lock:
            now = time.perf_counter()
            elapsed = now - self._since
            if total > 0:
                for name, weight in weights.items():
                    self._totals[_INDEX[name]] += elapsed * weight / total
            else:
                self._totals[self._current] += elapsed
            self._since = now
        return elapsed

    def snapshot(self) -> np.ndarray:
        """Seconds per activity so far (float64, SAMPLER_ACTIVITIES order), the running one included."""
        with self._lock:
            out = self._totals.copy()
            out[self._current] += time.perf_counter() - self._since
        return out

    def totals(self) -> dict[str, float]:
        """`snapshot()` by activity name."""
        return dict(zip(SAMPLER_ACTIVITIES, self.snapshot().tolist(), strict=True))
