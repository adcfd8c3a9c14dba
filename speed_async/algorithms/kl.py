"""Low-variance KL penalty to a reference policy (the k3 estimator, as in SPEED.md and VeRL)."""

from __future__ import annotations

import torch
from torch import Tensor

from speed_async.algorithms.losses import LOG_RATIO_LIMIT, check_same_shape, masked_mean

KL_CLAMP = 10.0


def low_var_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): with d = ref_logprobs - logprobs, exp(d) - d - 1.

    The result has the shape of the inputs and is clamped to [-10, 10] (it is >= 0 in exact arithmetic).
    d is first clamped to [-20, 20], which changes no value (beyond it k3 exceeds 10 anyway) but keeps exp()
    finite, so clamped tokens get a zero gradient instead of NaN. Gradient flows only into `logprobs`.
    Raises ValueError for mismatched shapes.
    """
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    d = (ref_logprobs.detach() - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return (torch.exp(d) - d - 1).clamp(-KL_CLAMP, KL_CLAMP)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """Token mean of `low_var_kl` over `mask`: sum(k3 · mask) / normalizer.

    Same normalizer contract as `policy_loss`: default mask.sum() of this call; the learner passes the
    global number of response tokens of the mini-batch across micro-batches and data-parallel ranks.
    Raises ValueError for mismatched shapes or normalizer <= 0.
    """
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    return masked_mean(low_var_kl(logprobs, ref_logprobs), mask, normalizer)
