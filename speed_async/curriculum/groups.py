"""Sampler-side group assembly: SPEED screening + continuation, plain groups, DAPO dynamic sampling.

    work items ──► [new] ──screen (n)──► qualified? ──no──► ScreenOutcome(rejected)
                                          │yes: ScreenOutcome(qualified)
                                          ▼
                                      [pending] ──decide(go=False)──► dropped (the dispatcher re-issues it)
                                          │decide(go=True)
                                          ▼
                  [continue] ──n_continue──► CompletedGroup (screening + continuation responses)

A qualified screen waits in [pending] for the dispatcher's decision (`ContinueDecision`): it is continued only
while a batch slot it can reach is open (see `speed_async.curriculum.dispatch`). `next_batch` takes every
waiting continuation plus up to `max_new` new prompts, so screening of fresh prompts and continuation of
qualified ones share the engine. A group is emitted as soon as it is complete. The object is pure bookkeeping:
no engine, no sockets, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Mode = Literal["speed", "none", "dapo"]


@dataclass(frozen=True)
class Response:
    """One sampled response with its behaviour log-probs, scores and the policy versions that produced it."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    score: float
    reward: float
    version_min: int
    version_max: int


@dataclass
class PromptWork:
    """One prompt held by a sampler, from screening to its complete group."""

    prompt_id: int
    epoch: int
    data_source: str
    prompt_token_ids: np.ndarray
    ground_truth: str
    num_screen: int
    num_continue: int
    extra: str = "{}"
    """The row's other fields as JSON, for the reward function."""
    responses: list[Response] = field(default_factory=list)
    stage: Literal["screen", "continue"] = "screen"

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.prompt_id)


@dataclass(frozen=True)
class ScreenOutcome:
    """SPEED screening result of one prompt (qualified or rejected)."""

    work: PromptWork
    scores: np.ndarray
    qualified: bool
    version: int


@dataclass(frozen=True)
class CompletedGroup:
    """A complete training group: every response of the prompt, screening included."""

    work: PromptWork
    responses: list[Response]
    num_screen: int

    @property
    def version(self) -> int:
        return min(r.version_min for r in self.responses)


@dataclass(frozen=True)
class DroppedGroup:
    """A DAPO group whose scores are all equal (no gradient), or a prompt given up."""

    work: PromptWork
    scores: np.ndarray
    reason: str
    version: int


Outcome = ScreenOutcome | CompletedGroup | DroppedGroup


class GroupAssembler:
    """Holds a sampler's prompts between generation calls and turns finished samples into outcomes."""

    def __init__(self, mode: Mode, pass_rate_low: float = 0.0, pass_rate_high: float = 1.0) -> None:
        self.mode = mode
        self.pass_rate_low = pass_rate_low
        self.pass_rate_high = pass_rate_high
        self._new: deque[PromptWork] = deque()
        self._pending: dict[tuple[int, int], PromptWork] = {}
        self._continue: deque[PromptWork] = deque()

    def add(self, items: Iterable[PromptWork]) -> None:
        """Queue freshly assigned prompts for their first generation call."""
        for work in items:
            if work.num_screen < 1 or work.num_continue < 0:
                raise ValueError(f"prompt {work.key}: num_screen must be >= 1 and num_continue >= 0")
            self._new.append(work)

    @property
    def num_new(self) -> int:
        return len(self._new)

    @property
    def num_continue(self) -> int:
        return len(self._continue)

    @property
    def num_pending(self) -> int:
        """Qualified screens waiting for the dispatcher's decision."""
        return len(self._pending)

    def pending(self) -> list[PromptWork]:
        """The qualified screens waiting for a decision, oldest first."""
        return list(self._pending.values())

    def decide(self, key: tuple[int, int], go: bool) -> PromptWork | None:
        """The dispatcher's decision on the pending screen `key`: continue it (queued for `next_batch`) or drop
        it. Returns its work, or None for a key that is not pending (already dropped: the decision is moot)."""
        work = self._pending.pop(key, None)
        if work is not None and go:
            self._continue.append(work)
        return work

    def held_keys(self) -> list[tuple[int, int]]:
        """(epoch, prompt_id) of every prompt waiting here (not those inside a generation call)."""
        return [w.key for w in self._continue] + list(self._pending) + [w.key for w in self._new]

    def next_batch(self, max_new: int) -> list[tuple[PromptWork, int]]:
        """Take every waiting continuation and up to `max_new` new prompts: (work, samples to draw) pairs."""
        batch = [(w, w.num_continue) for w in self._continue]
        self._continue.clear()
        while self._new and max_new > 0:
            work = self._new.popleft()
            batch.append((work, work.num_screen))
            max_new -= 1
        return batch

    def complete(self, work: PromptWork, responses: list[Response]) -> Outcome | None:
        """Record the samples of one generation call for `work`; return what it produced, if anything final.

        Returns a ScreenOutcome for a SPEED screening (a qualified prompt waits for `decide`; its CompletedGroup
        follows its continuation), a CompletedGroup, or a DroppedGroup.
        """
        expected = work.num_screen if work.stage == "screen" else work.num_continue
        assert len(responses) == expected, f"{work.key}: expected {expected} responses, got {len(responses)}"
        scores = np.array([r.score for r in responses], dtype=np.float32)
        version = min(r.version_min for r in responses)
        if work.stage == "continue":
            group = work.responses + responses
            return CompletedGroup(work=work, responses=group, num_screen=work.num_screen)
        if self.mode == "speed" and work.num_continue > 0:
            pass_rate = float(scores.mean())
            qualified = self.pass_rate_low < pass_rate < self.pass_rate_high
            if qualified:
                work.responses = list(responses)
                work.stage = "continue"
                self._pending[work.key] = work
            return ScreenOutcome(work=work, scores=scores, qualified=qualified, version=version)
        if self.mode == "dapo" and float(scores.std()) == 0.0:
            return DroppedGroup(work=work, scores=scores, reason="zero_variance", version=version)
        return CompletedGroup(work=work, responses=list(responses), num_screen=work.num_screen)
