"""The sampler's book of work in flight: stages of prompts, their engine requests, and the engine time they use.

A stage is one batch of samples of one prompt that completes together: a SPEED screening (n samples), its
continuation (n_continue), a plain group, or a held-out evaluation item. Each sample is one engine request.
A request records the policy version of the engine when it was submitted and when it finished (weights may
change in between, see `speed_async.sampler.loop`); its response carries both, so a group's version is the
minimum over its responses. Engine time is shared out evenly among the requests in flight at each step, so an
evaluation item knows how much of the engine it took (`EvalResult.seconds`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from speed_async.curriculum.groups import PromptWork, Response


@dataclass
class Stage:
    """One stage of one prompt: `expected` samples, each an engine request, then a score."""

    work: PromptWork
    expected: int
    eval_version: int | None
    """The weights being evaluated, or None for training work."""
    responses: dict[int, Response] = field(default_factory=dict)
    outstanding: set[str] = field(default_factory=set)
    """Request ids still in the engine."""
    scoring: int = 0
    """Responses finished by the engine, waiting for their score."""
    engine_s: float = 0.0
    """Seconds of engine time its finished requests took (their share of each step they were in)."""
    first_version: int = 0
    """The oldest version of the prompt's responses: the engine's when this stage was submitted, or its screen's
    for a continuation (the group's version can be no newer)."""
    closed: bool = False
    """Aborted or completed: late scores for it are ignored."""

    @property
    def is_eval(self) -> bool:
        return self.eval_version is not None

    @property
    def is_screen(self) -> bool:
        """A training prompt's first samples (SPEED's screen, or a plain group)."""
        return not self.is_eval and self.work.stage == "screen"

    @property
    def complete(self) -> bool:
        return len(self.responses) == self.expected

    def ordered_responses(self) -> list[Response]:
        """The responses in sample order."""
        return [self.responses[i] for i in range(self.expected)]


@dataclass(frozen=True)
class _Request:
    stage: Stage
    index: int
    version: int
    share_at_submit: float


class RequestBook:
    """Stages and engine requests in flight, and the per-request engine-time integral."""

    def __init__(self) -> None:
        self._requests: dict[str, _Request] = {}
        self._stages: dict[int, Stage] = {}  # by id(stage), oldest first
        self._serial = itertools.count()
        self._share = 0.0  # engine seconds per request in flight, integrated over steps
        self._eval_requests = 0  # counted as they come and go: the loop reads them every engine step
        self._screens = 0

    def open(self, work: PromptWork, count: int, version: int, eval_version: int | None = None) -> list[str]:
        """A new stage of `count` samples of `work` at engine version `version`; returns its request ids."""
        oldest = min([version, *(r.version_min for r in work.responses)])  # a continuation's screen came first
        stage = Stage(work=work, expected=count, eval_version=eval_version, first_version=oldest)
        kind = "train" if eval_version is None else f"eval{eval_version}"
        serial = next(self._serial)
        ids = [f"{kind}-{work.epoch}-{work.prompt_id}-{serial}-{i}" for i in range(count)]
        for i, rid in enumerate(ids):
            self._requests[rid] = _Request(stage, i, version, self._share)
            stage.outstanding.add(rid)
        self._stages[id(stage)] = stage
        self._eval_requests += count if stage.is_eval else 0
        self._screens += stage.is_screen
        return ids

    def charge(self, seconds: float) -> None:
        """An engine step of `seconds` ran every request in flight; call before `finish` of its requests."""
        if self._requests:
            self._share += seconds / len(self._requests)

    def in_flight(self) -> tuple[int, int]:
        """(training requests, evaluation requests) in the engine."""
        return len(self._requests) - self._eval_requests, self._eval_requests

    @property
    def screening(self) -> int:
        """Open screening stages (training prompts whose first samples are not all scored yet)."""
        return self._screens

    def finish(self, request_id: str) -> tuple[Stage, int, int] | None:
        """The engine finished `request_id`: (its stage, sample index, version at submission), or None for a
        request the book no longer holds (aborted)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        stage = request.stage
        if stage.is_eval:
            self._eval_requests -= 1
        stage.outstanding.discard(request_id)
        stage.scoring += 1
        stage.engine_s += self._share - request.share_at_submit
        return stage, request.index, request.version

    def add_response(self, stage: Stage, index: int, response: Response) -> bool:
        """Record a scored response; True when that completes its (open) stage, which then leaves the book."""
        if stage.closed:
            return False
        stage.scoring -= 1
        stage.responses[index] = response
        if stage.complete:
            self._close(stage)
            return True
        return False

    def abort(self, which: Callable[[Stage], bool]) -> tuple[list[Stage], list[str]]:
        """Close every open stage for which `which(stage)` holds: (those stages, their request ids still in the
        engine, for the caller to abort there)."""
        stages = [s for s in self._stages.values() if which(s)]
        ids = []
        for stage in stages:
            for rid in stage.outstanding:
                if self._requests.pop(rid, None) is not None and stage.is_eval:
                    self._eval_requests -= 1
                ids.append(rid)
            stage.outstanding.clear()
            self._close(stage)
        return stages, ids

    def stages(self) -> Iterator[Stage]:
        """The open stages, oldest first."""
        return iter(list(self._stages.values()))

    def clear(self) -> list[str]:
        """Forget everything; returns the request ids still in the engine."""
        ids = list(self._requests)
        for stage in self._stages.values():
            stage.closed = True
        self._requests.clear()
        self._stages.clear()
        self._eval_requests = self._screens = 0
        return ids

    def _close(self, stage: Stage) -> None:
        stage.closed = True
        del self._stages[id(stage)]
        self._screens -= stage.is_screen
