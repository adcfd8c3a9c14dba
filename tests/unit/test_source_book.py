"""Per data source books: screening accept rates, batch reward means and the samplers' reward stats."""

from __future__ import annotations

import math

import numpy as np

from speed_async.curriculum.train_group import TrainGroup
from speed_async.orchestrator.sources import SourceBook
from speed_async.protocol import RewardStats


def group(source: str, rewards: list[float]) -> TrainGroup:
    n = len(rewards)
    return TrainGroup(
        prompt_id=0,
        epoch=0,
        data_source=source,
        prompt_token_ids=np.array([1, 2], np.int32),
        responses=[np.array([3], np.int32)] * n,
        behaviour_logprobs=[np.array([-1.0], np.float32)] * n,
        rewards=np.array(rewards, np.float32),
        version=0,
    )


def stats(source: str, responses: int, score: float, error: int = 0, **metrics: tuple[float, int]) -> RewardStats:
    names = ["score", *metrics]
    return RewardStats(
        sampler_id=0,
        data_source=source,
        responses=responses,
        failed_error=error,
        failed_invalid=0,
        failed_timeout=0,
        metric_names=names,
        metric_sums=np.array([score, *(m[0] for m in metrics.values())], dtype="<f4"),
        metric_counts=np.array([responses, *(m[1] for m in metrics.values())], dtype="<i4"),
    )


def test_every_source_in_every_record_with_counts_and_span_means() -> None:
    book = SourceBook(["math", "countdown"])
    # Screening: math 3 of 4 qualify; countdown 1 of 4.
    for source, accepted in (
        [("math", True)] * 3 + [("math", False)] + [("countdown", True)] + [("countdown", False)] * 3
    ):
        book.screened(source, accepted)
    # Batch: two math groups with rewards (1, 0) and (1, 1, 0, 0): mean of the 6 responses = 3/6 = 0.5.
    book.trained([group("math", [1, 0]), group("math", [1, 1, 0, 0])])
    # Reward stats from two messages: countdown 10 + 6 responses, scores 4 + 2, one error; metric "valid" 8 of 12.
    book.on_reward_stats(stats("countdown", 10, 4.0, error=1, valid=(6.0, 8)))
    book.on_reward_stats(stats("countdown", 6, 2.0, valid=(3.0, 4)))
    m = book.metrics("speed")
    assert m["source/math/accept_rate"] == 0.75 and m["source/countdown/accept_rate"] == 0.25
    assert m["source/math/screened"] == 4 and m["source/math/groups"] == 2 and m["source/math/reward_mean"] == 0.5
    assert m["source/countdown/groups"] == 0 and math.isnan(m["source/countdown/reward_mean"])
    assert m["reward/countdown/responses"] == 16 and m["reward/countdown/failed"] == 1
    assert m["reward/countdown/failed/error"] == 1 and m["reward/countdown/failed/timeout"] == 0
    assert m["reward/countdown/score_mean"] == 6.0 / 16 and m["reward/countdown/valid"] == 9.0 / 12
    assert math.isnan(m["reward/math/score_mean"]) and "reward/math/valid" not in m
    # The next record: counts stay (cumulative), span means and the batch start again.
    m = book.metrics("speed")
    assert m["reward/countdown/responses"] == 16 and math.isnan(m["reward/countdown/score_mean"])
    assert m["source/math/groups"] == 0 and m["source/math/accept_rate"] == 0.75
    # A source that only reports scores joins the records; plain groups accept every prompt.
    book.on_reward_stats(stats("extra", 2, 2.0))
    m = book.metrics("none")
    assert m["reward/extra/score_mean"] == 1.0 and m["source/extra/accept_rate"] == 1.0
