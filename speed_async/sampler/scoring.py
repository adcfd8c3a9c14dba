"""Scoring beside generation: finished samples go to the reward workers, scored responses come back later.

The engine hands over each sample as it finishes; `Scorer.submit` decodes it and passes it to the reward pool
(`speed_async.rewards.RewardPool`, worker processes: the data source's reward function, reward.functions or
builtin, else Math-Verify) without waiting. `Scorer.collect` takes the scores that
came back so far (the sampler calls it after every engine step) and returns each as a `Response` carrying its
reward (score + DAPO overlong penalty) and the versions of the weights that generated it. So the engine never
waits for a score: scoring runs on other cores while the next engine steps run. `Scorer.take_stats` hands
over what the pool counted per data source of the training samples (evaluation samples are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from speed_async.config import Config
from speed_async.curriculum.groups import Response
from speed_async.rewards import RewardItem, RewardPool, SourceStats, effective_functions, overlong_penalty
from speed_async.sampler.inflight import Stage


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

    def __init__(self, config: Config, tokenizer: object, *, cpus: set[int] | None = None) -> None:
        self.pool = RewardPool(
            num_workers=config.pipeline.reward_workers,
            timeout_s=config.pipeline.reward_timeout_s,
            cpus=cpus,
            functions=effective_functions(config.reward.functions),
        )
        self.tokenizer = tokenizer
        self.buffer = config.algorithm.overlong_buffer
        self.max_len = config.rollout.max_response_length
        self._owners: dict[int, _Owner] = {}

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

    def collect(self, timeout_s: float) -> list[tuple[Stage, int, Response]]:
        """The responses scored so far (waiting up to `timeout_s` for the first), as (stage, index, response)."""
        out = []
        for ticket, score in self.pool.poll(timeout_s).items():
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
        """Stop the reward workers."""
        self.pool.close()
