"""Held-out evaluation bookkeeping of the dispatcher: who evaluates which prompts, and the tallies.

An evaluation of version v splits the held-out prompts over the live samplers (prompt i goes to the i-th
modulo their number). Each sampler generates its share before it loads newer weights, so every score is
measured on exactly version v. The accuracy per data source is reported once every prompt has a result. An
evaluation whose sampler is lost before it delivered its share is abandoned (reported as such, never as a
partial accuracy): re-sending its prompts could only measure a newer version.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speed_async.data.prepare import Prompt
from speed_async.protocol import EvalAssignment, EvalResult, WorkItem


@dataclass(frozen=True)
class EvalOutcome:
    """A finished evaluation of `version`: accuracy per data source (None: abandoned) and its cost in time."""

    version: int
    accuracy: dict[str, float] | None
    seconds: float = 0.0
    """The slowest sampler's seconds of generating and scoring its share (the time it took from training)."""


class EvalBook:
    """Expected and received eval results per version (dispatcher thread only)."""

    def __init__(self, prompts: Sequence[Prompt], samples_per_prompt: int) -> None:
        self.prompts = prompts
        self.samples_per_prompt = samples_per_prompt
        self._expected: dict[int, int] = {}
        self._tally: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._outstanding: dict[int, dict[int, set[int]]] = {}  # version -> sampler -> prompt ids not yet in
        self._seconds: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))  # version -> sampler

    def assignments(self, version: int, samplers: Sequence[int]) -> list[tuple[int, EvalAssignment]]:
        """(sampler id, its share) of an evaluation of `version` over `samplers`."""
        if not self.prompts or not samplers:
            return []
        self._expected[version] = len(self.prompts)
        self._outstanding[version] = {}
        out = []
        for s, sampler_id in enumerate(samplers):
            items = [
                WorkItem(
                    prompt_id=i,
                    epoch=0,
                    data_source=p.data_source,
                    prompt_token_ids=p.token_ids,
                    ground_truth=p.ground_truth,
                    num_screen=self.samples_per_prompt,
                    num_continue=0,
                    extra=p.extra,
                )
                for i, p in enumerate(self.prompts)
                if i % len(samplers) == s
            ]
            if items:
                self._outstanding[version][sampler_id] = {item.prompt_id for item in items}
                out.append((sampler_id, EvalAssignment(items=items, version=version)))
        return out

    def on_result(self, msg: EvalResult) -> EvalOutcome | None:
        """Record one prompt's scores; the outcome once that evaluation is complete."""
        outstanding = self._outstanding.get(msg.version)
        if outstanding is None or msg.prompt_id not in outstanding.get(msg.sampler_id, set()):
            return None  # an abandoned evaluation, or a duplicate
        outstanding[msg.sampler_id].discard(msg.prompt_id)
        tally = self._tally[msg.version]
        tally[msg.data_source].append(float(np.mean(msg.scores)))
        self._seconds[msg.version][msg.sampler_id] += msg.seconds
        if sum(len(v) for v in tally.values()) < self._expected[msg.version]:
            return None
        accs = {source: float(np.mean(v)) for source, v in tally.items()}
        seconds = max(self._seconds[msg.version].values())
        self._forget(msg.version)
        return EvalOutcome(msg.version, accs, seconds)

    def sampler_lost(self, sampler_id: int) -> list[int]:
        """Abandon the evaluations `sampler_id` still owed results to; returns their versions."""
        versions = [v for v, by in self._outstanding.items() if by.get(sampler_id)]
        for version in versions:
            self._forget(version)
        return versions

    def _forget(self, version: int) -> None:
        self._expected.pop(version, None)
        self._outstanding.pop(version, None)
        self._tally.pop(version, None)
        self._seconds.pop(version, None)
