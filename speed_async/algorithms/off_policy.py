"""Truncated importance sampling (TIS) for stale rollouts (ARCHITECTURE.md, "Off-policy correction").

Three policies meet in an asynchronous step: pi_behaviour generated the response (the sampler's weights,
possibly `lag` versions old), pi_old is the learner's weights at the start of this step (before the update),
and pi_theta is being optimised. The PPO ratio pi_theta / pi_old handles the update; the TIS weight
min(pi_old / pi_behaviour, cap) corrects, per token, for sampling from pi_behaviour instead of pi_old.
"""

from __future__ import annotations

import torch
from torch import Tensor

from speed_async.algorithms.losses import check_same_shape


def truncated_importance_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, cap: float) -> Tensor:
    """Per-token TIS weights min(exp(old_logprobs - behaviour_logprobs), cap), detached (no gradient).

    `old_logprobs`: the learner's recomputed log-probs of the sampled tokens with the weights of this step
    before the update (pi_old). `behaviour_logprobs`: the log-probs the sampler reported when it generated
    them (pi_behaviour, possibly stale). Both `[batch, response_len]`; padding positions produce arbitrary
    weights that the loss mask removes. Raises ValueError for mismatched shapes or cap < 1.
    """
    check_same_shape("old_logprobs", old_logprobs, behaviour_logprobs=behaviour_logprobs)
    if cap < 1:
        raise ValueError(f"cap (TIS truncation) must be >= 1, got {cap}")
    with torch.no_grad():
        return torch.exp(old_logprobs - behaviour_logprobs).clamp(max=cap)
