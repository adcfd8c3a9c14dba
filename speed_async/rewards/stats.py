"""What the reward pool scores (`RewardItem`) and what it counts per data source (`SourceStats`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from speed_async.rewards.functions import FAILURE_KINDS


@dataclass(frozen=True)
class RewardItem:
    """One response to score."""

    response: str
    ground_truth: str
    data_source: str = ""
    """Chooses the reward function (reward.functions, the builtin ones, else Math-Verify) and the stats entry."""
    extra: str = "{}"
    """The row's other fields as a JSON object: the third argument of a configured function."""
    counted: bool = True
    """Whether its outcome enters the per-source stats (training responses; evaluation ones are not)."""

    def __post_init__(self) -> None:
        for name in ("response", "ground_truth", "data_source", "extra"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"RewardItem.{name} must be a str, got {type(getattr(self, name)).__name__}")


@dataclass
class SourceStats:
    """Counts and sums of one data source's scored responses (over some span: see RewardPool.take_source_stats)."""

    responses: int = 0
    """Responses scored (a failed one included, with score 0)."""
    score_sum: float = 0.0
    """Sum of their scores."""
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    """Responses whose function failed, by kind (FAILURE_KINDS); each scored 0."""
    metric_sums: dict[str, float] = field(default_factory=dict)
    """Sum of each extra metric the function returned, over the responses that returned it."""
    metric_counts: dict[str, int] = field(default_factory=dict)
    """How many responses returned each metric."""

    def add(self, score: float, metrics: Mapping[str, float]) -> None:
        """A response the function scored."""
        self.responses += 1
        self.score_sum += score
        for name, value in metrics.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value
            self.metric_counts[name] = self.metric_counts.get(name, 0) + 1

    def fail(self, kind: str) -> None:
        """A response whose function failed (`kind` in FAILURE_KINDS): it scored 0."""
        assert kind in FAILURE_KINDS, kind
        self.responses += 1
        self.failed[kind] += 1

    def merge(self, other: SourceStats) -> None:
        """Add `other`'s counts and sums to these."""
        self.responses += other.responses
        self.score_sum += other.score_sum
        for kind, count in other.failed.items():
            self.failed[kind] = self.failed.get(kind, 0) + count
        for name, value in other.metric_sums.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value
            self.metric_counts[name] = self.metric_counts.get(name, 0) + other.metric_counts[name]
