"""Conversions between wire messages and the learner's own objects (dispatcher thread)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from speed_async.config import Config
from speed_async.curriculum.dispatch import Key
from speed_async.curriculum.train_group import TrainGroup
from speed_async.data.prepare import Prompt
from speed_async.protocol import RolloutGroup, WorkItem


def to_train_group(msg: RolloutGroup) -> TrainGroup:
    """Wire message -> the learner's group (arrays copied out of the receive buffer)."""
    responses = list(msg.responses())
    return TrainGroup(
        prompt_id=msg.prompt_id,
        epoch=msg.epoch,
        data_source=msg.data_source,
        prompt_token_ids=np.array(msg.prompt_token_ids, dtype=np.int32),
        responses=[np.array(r.token_ids, dtype=np.int32) for r in responses],
        behaviour_logprobs=[np.array(r.logprobs, dtype=np.float32) for r in responses],
        rewards=np.array(msg.rewards, dtype=np.float32),
        version=msg.group_version,
    )


def work_items(prompts: Sequence[Prompt], keys: Sequence[Key], config: Config) -> list[WorkItem]:
    """The training work items of `keys` ((epoch, prompt index)): screen with rollout.n, then (SPEED only)
    continue with rollout.n_continue."""
    speed, rollout = config.curriculum.mode == "speed", config.rollout
    return [
        WorkItem(
            prompt_id=pid,
            epoch=epoch,
            data_source=prompts[pid].data_source,
            prompt_token_ids=prompts[pid].token_ids,
            ground_truth=prompts[pid].ground_truth,
            num_screen=rollout.n,
            num_continue=rollout.n_continue if speed else 0,
            extra=prompts[pid].extra,
        )
        for epoch, pid in keys
    ]
