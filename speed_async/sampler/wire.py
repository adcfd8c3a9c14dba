"""Between the wire and the sampler's work: WorkItem in, RolloutGroup out."""

from __future__ import annotations

import numpy as np

from speed_async.curriculum.groups import CompletedGroup, PromptWork
from speed_async.protocol import RolloutGroup


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
