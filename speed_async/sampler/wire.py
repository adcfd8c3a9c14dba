"""Between the wire and the sampler's work: WorkItem in; ScreenReport, RolloutGroup, GroupDropped, EvalResult,
RewardStats out."""

from __future__ import annotations

import numpy as np

from speed_async.curriculum.groups import CompletedGroup, DroppedGroup, Outcome, PromptWork, Response, ScreenOutcome
from speed_async.protocol import EvalResult, GroupDropped, Message, RewardStats, RolloutGroup, ScreenReport
from speed_async.rewards import SourceStats


def work_from_item(item: object) -> PromptWork:
    """The sampler's own work record for a WorkItem of an assignment (token ids as an int32 array)."""
    return PromptWork(
        prompt_id=item.prompt_id,
        epoch=item.epoch,
        data_source=item.data_source,
        prompt_token_ids=np.asarray(item.prompt_token_ids, dtype=np.int32),
        ground_truth=item.ground_truth,
        num_screen=item.num_screen,
        num_continue=item.num_continue,
        extra=item.extra,
    )


def rollout_group_message(sampler_id: int, group: CompletedGroup) -> RolloutGroup:
    """Pack a complete group into its wire message (responses concatenated, screening responses first)."""
    rs = group.responses
    return RolloutGroup(
        sampler_id=sampler_id,
        prompt_id=group.work.prompt_id,
        epoch=group.work.epoch,
        data_source=group.work.data_source,
        prompt_token_ids=group.work.prompt_token_ids,
        response_token_ids=np.concatenate([r.token_ids for r in rs]).astype(np.int32),
        response_lengths=np.array([len(r.token_ids) for r in rs], dtype=np.int32),
        response_logprobs=np.concatenate([r.logprobs for r in rs]).astype(np.float32),
        rewards=np.array([r.reward for r in rs], dtype=np.float32),
        scores=np.array([r.score for r in rs], dtype=np.float32),
        finish_reasons=[r.finish_reason for r in rs],
        version_min=np.array([r.version_min for r in rs], dtype=np.int32),
        version_max=np.array([r.version_max for r in rs], dtype=np.int32),
        num_screen=group.num_screen,
    )


def dropped_message(
    sampler_id: int, work: PromptWork, reason: str, version: int, scores: np.ndarray | None = None
) -> GroupDropped:
    """`work` yields no group from this sampler (`reason`); `scores` are those of its screen, if any."""
    return GroupDropped(
        sampler_id=sampler_id,
        prompt_id=work.prompt_id,
        epoch=work.epoch,
        version=version,
        reason=reason,
        rewards=np.zeros(0, dtype=np.float32) if scores is None else scores,
    )


def outcome_message(sampler_id: int, outcome: Outcome | None) -> Message | None:
    """The message for what a completed stage came to: a screen's report, a group, a drop (or nothing)."""
    if isinstance(outcome, ScreenOutcome):
        w = outcome.work
        return ScreenReport(
            sampler_id=sampler_id,
            prompt_id=w.prompt_id,
            epoch=w.epoch,
            version=outcome.version,
            rewards=outcome.scores,
            qualified=outcome.qualified,
        )
    if isinstance(outcome, CompletedGroup):
        return rollout_group_message(sampler_id, outcome)
    if isinstance(outcome, DroppedGroup):
        return dropped_message(sampler_id, outcome.work, outcome.reason, outcome.version, outcome.scores)
    return None


def eval_result_message(
    sampler_id: int, work: PromptWork, version: int, responses: list[Response], seconds: float
) -> EvalResult:
    """The scores of one held-out item evaluated at weights `version` (`seconds`: its share of the engine)."""
    return EvalResult(
        sampler_id=sampler_id,
        prompt_id=work.prompt_id,
        data_source=work.data_source,
        version=version,
        scores=np.array([r.score for r in responses], dtype=np.float32),
        response_lengths=np.array([len(r.token_ids) for r in responses], dtype=np.int32),
        seconds=seconds,
    )


def reward_stats_messages(sampler_id: int, stats: dict[str, SourceStats]) -> list[RewardStats]:
    """One RewardStats per data source of `stats` that scored anything."""
    out = []
    for source, entry in sorted(stats.items()):
        if not entry.responses:
            continue
        names = ["score", *sorted(entry.metric_sums)]
        out.append(
            RewardStats(
                sampler_id=sampler_id,
                data_source=source,
                responses=entry.responses,
                failed_error=entry.failed["error"],
                failed_invalid=entry.failed["invalid"],
                failed_timeout=entry.failed["timeout"],
                metric_names=names,
                metric_sums=np.array([entry.score_sum, *(entry.metric_sums[n] for n in names[1:])], dtype="<f4"),
                metric_counts=np.array([entry.responses, *(entry.metric_counts[n] for n in names[1:])], dtype="<i4"),
            )
        )
    return out
