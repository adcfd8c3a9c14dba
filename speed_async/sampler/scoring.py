"""Scoring beside generation: finished samples go to the reward workers, scored responses come back later.

The engine hands over each sample as it finishes; `Scorer.submit` decodes it and passes it to the reward pool
(`speed_async.rewards.RewardPool`, worker processes: the data source's reward function, reward.functions or
builtin, else Math-Verify) without waiting. `Scorer.collect` takes the scores that
came back so far (the sampler calls it after every engine step) and returns each as a `Response` carrying its
reward (score + DAPO overlong penalty) and the versions of the weights that generated it. So the engine never
waits for a score: scoring runs on other cores while the next engine steps run. `Scorer.take_stats` hands
over what the pool counted per data source of the training samples (evaluation samples are not counted).

A pump thread keeps the reward workers busy: the pool hands a worker its next item only inside `poll`, and
the main loop polls once per engine step, so a worker would idle from the moment it finished an item until the
end of the engine step (measured: about one item per 25-ms step, most of a round's scores arriving only after
its last engine step). While samples are pending the thread waits for a worker's answer (outside the pool's
lock, which `submit` needs), polls, and queues what comes back; a worker gets its next item within milliseconds.
The thread runs on `pump_cpus` (the sampler passes the reward workers' cores other than the engine's, where there
are any): it wakes a few hundred times a second, and a thread that wakes that often on the engine's core costs
the engine 5-8% of its tokens/s (a thread waking 420 / 1,350 times a second: -5.1% / -8.4% on the same core,
+0.6% on the other; bare eager engine, one core, 2026-12-05).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass

from speed_async.config import Config
from speed_async.curriculum.groups import Response
from speed_async.rewards import RewardItem, RewardPool, SourceStats, effective_functions, overlong_penalty
from speed_async.sampler.inflight import Stage

log = logging.getLogger("speed_async.sampler")
PUMP_WAIT_S = 0.005
"""Longest wait of the pump thread for a worker's answer before it polls anyway (deadlines, new items)."""


@dataclass(frozen=True)
class _Owner:
    stage: Stage
    index: int
    completion: object  # engine.Completion: token_ids, logprobs, finish_reason
    version_min: int
    """The engine's version when the request was submitted."""
    version_max: int
    """The engine's version when it finished."""


class Scorer:
    """Reward pool + the samples it is scoring, by ticket."""

    def __init__(
        self, config: Config, tokenizer: object, *, cpus: set[int] | None = None, pump_cpus: set[int] | None = None
    ) -> None:
        self.pool = RewardPool(
            num_workers=config.pipeline.reward_workers,
            timeout_s=config.pipeline.reward_timeout_s,
            cpus=cpus,
            functions=effective_functions(config.reward.functions),
        )
        self._pump_cpus = pump_cpus
        self.tokenizer = tokenizer
        self.buffer = config.algorithm.overlong_buffer
        self.max_len = config.rollout.max_response_length
        self._owners: dict[int, _Owner] = {}
        self._scores: queue.SimpleQueue[dict[int, float]] = queue.SimpleQueue()
        self._submitted = threading.Event()
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self._pump = threading.Thread(target=self._pump_loop, name="reward-pump", daemon=True)
        self._pump.start()

    @property
    def pending(self) -> int:
        """Samples submitted and not yet collected."""
        return len(self._owners)

    def submit(self, finished: list[tuple[Stage, int, object, int, int]]) -> None:
        """Queue (stage, sample index, completion, version at submission, version at finish) for scoring."""
        items = [
            RewardItem(
                self.tokenizer.decode(c.token_ids, skip_special_tokens=True),
                stage.work.ground_truth,
                stage.work.data_source,
                stage.work.extra,
                counted=not stage.is_eval,
            )
            for stage, _, c, _, _ in finished
        ]
        for ticket, owner in zip(self.pool.submit(items), finished, strict=True):
            self._owners[ticket] = _Owner(*owner)
        self._submitted.set()

    def _pump_loop(self) -> None:
        """Poll the pool while it holds unfinished items, so workers get their next item as they finish."""
        if self._pump_cpus:
            try:
                os.sched_setaffinity(0, self._pump_cpus)  # this thread only (Linux: 0 is the calling thread)
            except OSError as err:  # scoring still works where it runs now, only a little slower
                log.warning(
                    "the reward pump thread stays on its cores: pinning it to %s failed: %s", self._pump_cpus, err
                )
        try:
            while not self._closing.is_set():
                if not self.pool.num_unfinished:
                    self._submitted.wait(0.05)
                    self._submitted.clear()
                    continue
                self.pool.wait_for_answer(PUMP_WAIT_S)
                done = self.pool.poll(0.0)
                if done:
                    self._scores.put(done)
        except BaseException as err:  # e.g. a replacement worker that fails to start: raised by collect()
            if not self._closing.is_set():
                self._error = err

    def _scored(self, timeout_s: float) -> dict[int, float]:
        """Scores the pump thread received, waiting up to `timeout_s` for the first batch of them."""
        if self._error is not None:
            raise RuntimeError(f"the reward pool failed: {self._error}") from self._error
        found: dict[int, float] = {}
        try:
            found.update(self._scores.get(timeout=timeout_s) if timeout_s > 0 else self._scores.get_nowait())
            while True:
                found.update(self._scores.get_nowait())
        except queue.Empty:
            pass
        return found

    def collect(self, timeout_s: float) -> list[tuple[Stage, int, Response]]:
        """The responses scored so far (waiting up to `timeout_s` for the first), as (stage, index, response)."""
        out = []
        for ticket, score in self._scored(timeout_s).items():
            owner = self._owners.pop(ticket, None)
            if owner is None:
                continue
            c = owner.completion
            length = len(c.token_ids)
            reward = score + (overlong_penalty(length, self.max_len, self.buffer) if self.buffer > 0 else 0.0)
            response = Response(
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                score=float(score),
                reward=float(reward),
                version_min=owner.version_min,
                version_max=owner.version_max,
            )
            out.append((owner.stage, owner.index, response))
        return out

    def take_stats(self) -> dict[str, SourceStats]:
        """Per data source, the training samples scored since the previous call (see RewardPool)."""
        return self.pool.take_source_stats()

    def forget(self) -> None:
        """Drop every pending sample (their late scores are ignored)."""
        self._owners.clear()

    def close(self) -> None:
        """Stop the pump thread and the reward workers."""
        self._closing.set()
        self._submitted.set()
        self._pump.join(timeout=5)
        self.pool.close()
