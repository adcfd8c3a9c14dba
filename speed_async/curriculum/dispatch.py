"""Dispatcher-side curriculum state: the data cursor, in-flight prompts, ready groups, pacing, staleness.

The dispatcher (learner rank 0) is the one owner of this object, which makes checkpoint/resume exact and lets
a dead sampler's work be re-issued. The pacing rule keeps stale drops rare:

    work handed out while samplers hold version v can be trained at steps first = max(v, next_step) .. v + k
    room  = (#those steps) * train_batch_size  -  ready groups  -  expected groups still in flight,
            counting only ready and in-flight work that can itself still be trained at step `first` or later
    hand out ceil(room / accept_rate) new prompts (accept_rate: running SPEED/DAPO yield, 1 for plain groups)

The yield is a running mean over the last ~ACCEPT_WINDOW screened prompts, started from a prior worth
ACCEPT_PRIOR_WEIGHT prompts. (An average over the last ~10, as before, swung between 0.1 and 0.3 at a true
yield of 0.2, so the hand-out swung 3x and a quarter of the qualified prompts at k = 0 were continued and then
dropped as stale.)

and `take_batch` still checks every group: lag = step - group version <= k, or the group is dropped (counted).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from speed_async.data.ordering import PromptCursor

Key = tuple[int, int]  # (epoch, prompt index)
ACCEPT_WINDOW = 200
"""Screened prompts the accept-rate estimate averages over, once it has seen that many."""
ACCEPT_PRIOR_WEIGHT = 8
"""The initial accept rate counts as this many screened prompts."""


class Versioned(Protocol):
    @property
    def version(self) -> int: ...


G = TypeVar("G", bound=Versioned)


@dataclass
class InFlight:
    """A prompt handed to a sampler and not yet finished."""

    sampler_id: int
    stage: Literal["screening", "continuing"]
    issued_version: int


class DispatchState(Generic[G]):
    """Cursor + in-flight + ready FIFO + the staleness rule, with `state_dict()` for checkpoints."""

    def __init__(
        self,
        num_prompts: int,
        *,
        seed: int,
        train_batch_size: int,
        max_staleness: int,
        mode: Literal["speed", "none", "dapo"],
        initial_accept_rate: float = 0.5,
    ) -> None:
        self.cursor = PromptCursor(num_prompts, seed)
        self.train_batch_size = train_batch_size
        self.max_staleness = max_staleness
        self.mode = mode
        self.version = 0
        self.next_step = 0
        self.in_flight: dict[Key, InFlight] = {}
        self.ready: deque[tuple[Key, G]] = deque()
        self.reissue: deque[Key] = deque()
        self.accept_rate = 1.0 if mode == "none" else initial_accept_rate
        self.accept_count = 0
        self.counters: Counter[str] = Counter()

    # ---- pacing ------------------------------------------------------------------------------------------
    def expected_groups_in_flight(self, first_step: int = 0) -> float:
        """Groups the in-flight prompts are expected to yield (screening ones at the running accept rate), of
        those issued recently enough to be trained at `first_step` or later."""
        k = self.max_staleness
        return sum(
            1.0 if f.stage == "continuing" else self.accept_rate
            for f in self.in_flight.values()
            if f.issued_version + k >= first_step
        )

    def room(self, sampler_version: int) -> float:
        """Groups that work generated now, at `sampler_version`, could still feed within the bound: the batches of
        the steps it can reach, less the ready and expected groups that can still be trained at those steps
        (older ones will be dropped as stale before then and leave their place)."""
        first = max(sampler_version, self.next_step)
        usable_steps = max(0, sampler_version + self.max_staleness - first + 1)
        if not usable_steps:
            return 0.0
        ready = sum(1 for _, g in self.ready if g.version + self.max_staleness >= first)
        return usable_steps * self.train_batch_size - ready - self.expected_groups_in_flight(first)

    def assign(self, sampler_id: int, sampler_version: int, max_prompts: int) -> list[Key]:
        """Prompts to hand to `sampler_id` now (possibly none); re-issued work goes first."""
        room = self.room(sampler_version)
        if room <= 0:
            return []
        wanted = min(max_prompts, math.ceil(room / max(self.accept_rate, 0.05)))
        keys: list[Key] = []
        while len(keys) < wanted:
            key = self.reissue.popleft() if self.reissue else self.cursor.next()
            self.in_flight[key] = InFlight(sampler_id, "screening", sampler_version)
            keys.append(key)
        self.counters["dispatched"] += len(keys)
        return keys

    # ---- results -----------------------------------------------------------------------------------------
    def _update_accept_rate(self, accepted: bool) -> None:
        """Running mean (prior included) until ACCEPT_WINDOW results, then an average with that memory."""
        alpha = 1.0 / min(self.accept_count + 1 + ACCEPT_PRIOR_WEIGHT, ACCEPT_WINDOW)
        self.accept_rate += alpha * ((1.0 if accepted else 0.0) - self.accept_rate)
        self.accept_count += 1

    def on_screened(self, key: Key, qualified: bool) -> bool:
        """A SPEED screening result; False if the prompt is not in flight (late or duplicate: ignored)."""
        flight = self.in_flight.get(key)
        if flight is None or flight.stage != "screening":
            self.counters["ignored_results"] += 1
            return False
        self._update_accept_rate(qualified)
        self.counters["qualified" if qualified else "rejected"] += 1
        if qualified:
            flight.stage = "continuing"
        else:
            del self.in_flight[key]
        return True

    def on_group(self, key: Key, group: G) -> bool:
        """A complete group arrived; False if the prompt is not in flight (late or duplicate: ignored)."""
        flight = self.in_flight.pop(key, None)
        if flight is None:
            self.counters["ignored_results"] += 1
            return False
        if self.mode != "speed":
            self._update_accept_rate(True)
        self.ready.append((key, group))
        self.counters["groups"] += 1
        return True

    def on_dropped(self, key: Key) -> bool:
        """A DAPO zero-variance group (no gradient); False if not in flight."""
        if self.in_flight.pop(key, None) is None:
            self.counters["ignored_results"] += 1
            return False
        self._update_accept_rate(False)
        self.counters["zero_variance"] += 1
        return True

    def sampler_lost(self, sampler_id: int) -> list[Key]:
        """Take back everything `sampler_id` held; it is handed out again first. Returns the keys."""
        lost = [key for key, f in self.in_flight.items() if f.sampler_id == sampler_id]
        for key in lost:
            del self.in_flight[key]
            self.reissue.append(key)
        self.counters["reissued"] += len(lost)
        return lost

    def give_back(self, key: Key) -> bool:
        """Re-issue one in-flight prompt whose result could not be used; False if it is not in flight."""
        if self.in_flight.pop(key, None) is None:
            return False
        self.reissue.append(key)
        self.counters["reissued"] += 1
        return True

    # ---- batches -----------------------------------------------------------------------------------------
    def take_batch(self, step: int) -> tuple[list[tuple[Key, G]] | None, list[tuple[Key, G]]]:
        """(the batch of RL step `step`, first in first out, or None if not enough usable groups are ready yet;
        the groups dropped as stale on the way). Every group in a batch satisfies step - version <= k."""
        assert step == self.next_step, f"batches are taken in order: expected step {self.next_step}, got {step}"
        stale = [(k, g) for k, g in self.ready if step - g.version > self.max_staleness]
        if stale:
            self.ready = deque((k, g) for k, g in self.ready if step - g.version <= self.max_staleness)
            self.counters["dropped_stale"] += len(stale)
        if len(self.ready) < self.train_batch_size:
            return None, stale
        batch = [self.ready.popleft() for _ in range(self.train_batch_size)]
        assert all(0 <= step - g.version <= self.max_staleness for _, g in batch)
        self.next_step += 1
        return batch, stale

    def untake(self, batch: list[tuple[Key, G]]) -> None:
        """Undo the last `take_batch` (its step was given up before it was trained): the groups go back to the
        front of the ready FIFO, in order, and that step is the next one again."""
        self.ready.extendleft(reversed(batch))
        self.next_step -= 1

    def published(self, version: int) -> None:
        """The samplers now have weights `version` (after RL step version - 1)."""
        assert version >= self.version, f"versions only grow: {self.version} -> {version}"
        self.version = version

    # ---- checkpoint --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Counters and gauges for metrics.jsonl."""
        screened = self.counters["qualified"] + self.counters["rejected"]
        return {
            "curriculum/accept_rate": self.counters["qualified"] / screened if screened else float("nan"),
            "curriculum/accept_rate_ema": self.accept_rate,
            "curriculum/ready_groups": float(len(self.ready)),
            "curriculum/in_flight": float(len(self.in_flight)),
            "dropped/stale_groups": float(self.counters["dropped_stale"]),
            "dropped/zero_variance_groups": float(self.counters["zero_variance"]),
            "curriculum/epoch": float(self.cursor.epoch),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything but the ready groups' payloads (the caller saves those) and in-flight work, which a
        resume re-issues first."""
        return {
            "cursor": self.cursor.state_dict(),
            "version": self.version,
            "next_step": self.next_step,
            "accept_rate": self.accept_rate,
            "accept_count": self.accept_count,
            "reissue": [list(k) for k in [*self.reissue, *self.in_flight]],
            "ready_keys": [list(k) for k, _ in self.ready],
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: Mapping[str, Any], ready: list[tuple[Key, G]]) -> None:
        """Restore from `state_dict()`; `ready` are the saved ready groups in FIFO order."""
        self.cursor.load_state_dict(state["cursor"])
        self.version = int(state["version"])
        self.next_step = int(state["next_step"])
        self.accept_rate = float(state["accept_rate"])
        self.accept_count = int(state.get("accept_count", ACCEPT_WINDOW))  # older checkpoints: a full window
        self.reissue = deque((int(e), int(p)) for e, p in state["reissue"])
        self.in_flight.clear()
        self.ready = deque(ready)
        self.counters = Counter(state["counters"])
