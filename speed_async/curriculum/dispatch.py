"""Dispatcher-side curriculum state: the data cursor, in-flight prompts, ready groups, pacing, staleness.

The dispatcher (learner rank 0) is the one owner of this object, which makes checkpoint/resume exact and lets
a dead sampler's work be re-issued. Pacing keeps generated work usable within the bound k:

    a group of version v can fill a batch slot of the steps max(v, next_step) .. v + k
    open slots(v) = those steps' slots left once the ready groups, the continuations in flight and (for new
                    screens) the screens in flight at the running accept rate are placed, earliest deadline
                    (version + k) first
    new prompts:     a sampler at version v gets ceil(open slots(v) / yield) of them, yield = accept_rate
                     (SPEED: accept_rate / SCREEN_SURPLUS, the surplus covering the yield's variance)
    continuations:   a qualified screen of version v is continued only while open slots(v) >= 1, counting
                     ready groups and continuations but not screens; otherwise the dispatcher declines it
                     (its prompt is handed out again later), so that no 12-sample continuation is generated
                     for a step whose batch is already full

The yield is a running mean over the last ~ACCEPT_WINDOW screened prompts, started from a prior worth
ACCEPT_PRIOR_WEIGHT prompts. (An average over the last ~10 swung between 0.1 and 0.3 at a true yield of 0.2.)
A SPEED screen costs n samples and its continuation n_continue; declining a surplus screen wastes the former
only, where continuing every qualified prompt (the reference code's rule) wasted both whenever more prompts
qualified than the step needed: 143 of 1,103 continued groups in a 60-step run at k = 1 (2026-12-04).

`take_batch` takes the ready groups of the oldest versions first (earliest deadline) and still checks every
group: lag = step - group version <= k, or the group is dropped (counted).
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
SCREEN_SURPLUS = 1.25
"""SPEED hands out this many times the screens its open slots need at the running accept rate. A surplus screen
that qualifies costs its n samples when it is declined; too few screens cost the learner a wait for another
round of screening (~16 +- 3 of 38 prompts qualify at a yield of 0.42, so half the steps came up short)."""


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
    group_version: int = 0
    """Continuing: the version of its screen, which its group will carry (the minimum over its responses)."""


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
    def open_slots(self, version: int, *, count_screens: bool) -> float:
        """Batch slots that a group of `version` could still fill: the unfilled slots of the steps it can reach
        (max(version, next_step) .. version + k) once the ready groups, the continuations in flight and, with
        `count_screens`, the screens in flight (each worth the accept rate) are placed, earliest deadline
        first, each in the earliest step it can reach that has room. Supply that fits no step is ignored (it
        will be dropped as stale)."""
        k, size = self.max_staleness, self.train_batch_size
        first, last = max(version, self.next_step), version + k
        if last < first:
            return 0.0
        supply = [(g.version, 1.0) for _, g in self.ready]
        for f in self.in_flight.values():
            if f.stage == "continuing":
                supply.append((f.group_version, 1.0))
            elif count_screens:
                supply.append((f.issued_version, self._screen_yield))
        filled: dict[int, float] = {}
        for v, amount in sorted(supply):  # by deadline v + k
            step = max(v, self.next_step)
            while amount > 1e-9 and step <= v + k:
                take = min(amount, size - filled.get(step, 0.0))
                filled[step] = filled.get(step, 0.0) + take
                amount -= take
                step += 1
        return sum(size - filled.get(t, 0.0) for t in range(first, last + 1))

    @property
    def _screen_yield(self) -> float:
        """Groups one screen in flight is counted as: the accept rate, less the surplus in SPEED mode (only SPEED
        can decline what turns out to be too much)."""
        return self.accept_rate / SCREEN_SURPLUS if self.mode == "speed" else self.accept_rate

    def room(self, sampler_version: int) -> float:
        """Groups that new screens handed out now, at `sampler_version`, could still feed within the bound."""
        return self.open_slots(sampler_version, count_screens=True)

    def assign(self, sampler_id: int, sampler_version: int, max_prompts: int) -> list[Key]:
        """Prompts to hand to `sampler_id` now (possibly none); re-issued work goes first."""
        room = self.room(sampler_version)
        if room <= 0:
            return []
        wanted = min(max_prompts, math.ceil(room / max(self._screen_yield, 0.05)))
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

    def on_screened(self, key: Key, qualified: bool, version: int) -> Literal["ignored", "rejected", "go", "declined"]:
        """A SPEED screening result of `version` (its responses' oldest); returns "ignored" if the prompt is not
        screening here (late or duplicate), "rejected", "go" (continue it: a batch slot it can reach is still
        open) or "declined" (every reachable slot is spoken for: the prompt is handed out again later)."""
        flight = self.in_flight.get(key)
        if flight is None or flight.stage != "screening":
            self.counters["ignored_results"] += 1
            return "ignored"
        self._update_accept_rate(qualified)
        self.counters["qualified" if qualified else "rejected"] += 1
        if not qualified:
            del self.in_flight[key]
            return "rejected"
        if self.open_slots(version, count_screens=False) < 1.0 - 1e-9:
            del self.in_flight[key]
            self.reissue.append(key)
            self.counters["declined"] += 1
            return "declined"
        flight.stage, flight.group_version = "continuing", version
        return "go"

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
        """(the batch of RL step `step`: the ready groups of the oldest versions, first in first out among equal
        versions, or None if not enough usable groups are ready yet; the groups dropped as stale on the way).
        Every group in a batch satisfies step - version <= k."""
        assert step == self.next_step, f"batches are taken in order: expected step {self.next_step}, got {step}"
        stale = [(k, g) for k, g in self.ready if step - g.version > self.max_staleness]
        if stale:
            self.ready = deque((k, g) for k, g in self.ready if step - g.version <= self.max_staleness)
            self.counters["dropped_stale"] += len(stale)
        if len(self.ready) < self.train_batch_size:
            return None, stale
        order = sorted(range(len(self.ready)), key=lambda i: self.ready[i][1].version)  # stable: FIFO within
        chosen = set(order[: self.train_batch_size])
        batch = [self.ready[i] for i in order[: self.train_batch_size]]
        self.ready = deque(item for i, item in enumerate(self.ready) if i not in chosen)
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
            "curriculum/declined_continuations": float(self.counters["declined"]),
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
