"""Clipped policy-gradient loss with dual clip (VeRL semantics) and the one token-mean aggregation.

Aggregation contract (shared by `policy_loss`, `kl_loss` and `masked_mean`): a call returns
sum(per_token_loss · mask) / normalizer. With the default normalizer (mask.sum() of this call) that is the
token mean of this call. The learner instead passes the GLOBAL number of response tokens of the whole
mini-batch, over all its micro-batches and all data-parallel ranks; then the losses (and gradients) of all
micro-batches and ranks SUM to the gradient of one token mean over the mini-batch, which is what SPEED.md
asks for. Averaging per micro-batch instead would weight a token of a short micro-batch more than one of a
long micro-batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Log-ratios are clamped to this range before exp() (as VeRL does). It changes no loss value that matters:
# past e^20 the ratio is clipped (A > 0) or dual-clipped (A < 0, c < e^20), and below e^-20 the unclipped
# branch is within |A|·2e-9 of 0. What it prevents is exp() overflowing to inf, whose backward gives
# 0 · inf = NaN gradients even for tokens whose loss is clipped.
LOG_RATIO_LIMIT = 20.0


def check_same_shape(reference_name: str, reference: Tensor, **others: Tensor | None) -> None:
    """Raise ValueError unless `reference` is 2-D [batch, response_len] and every non-None other matches it.

    The message names the offending argument and both shapes.
    """
    if reference.ndim != 2:
        raise ValueError(f"{reference_name} must be 2-D [batch, response_len], got shape {tuple(reference.shape)}")
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape "
                f"{tuple(reference.shape)}; every per-token tensor must be [batch, response_len]"
            )


def masked_mean(x: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """sum(x · mask) / normalizer, a scalar; see the module docstring for the normalizer contract.

    `normalizer` defaults to mask.sum() (clamped to at least 1, so an empty mask gives 0). A given
    normalizer must be > 0 (ValueError otherwise). `x` and `mask` must have the same shape.
    """
    if x.shape != mask.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but x has shape {tuple(x.shape)}")
    total = (x * mask).sum()
    if normalizer is None:
        return total / mask.sum().clamp(min=1)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (a number of response tokens), got {normalizer}")
    return total / normalizer


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float = 10.0,
    is_weights: Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-style clipped policy loss with dual clip, aggregated as one token mean.

    Every tensor is `[batch, response_len]`: `logprobs` (with grad) of the current weights, `old_logprobs`
    (pi_old), `advantages` already broadcast to tokens, `mask` 1.0 on response tokens. Gradient flows only
    into `logprobs`: the other inputs are detached.
    Per token, with ratio = exp(logprobs - old_logprobs):
        pg1 = -A·ratio,  pg2 = -A·clamp(ratio, 1 - clip_low, 1 + clip_high),  clipped = max(pg1, pg2),
        loss = min(clipped, -A·clip_c) where A < 0 (dual clip), else clipped;
    then multiplied by `is_weights` (truncated importance weights, detached) when given.

    Returns (loss, stats). loss = sum(loss_t · mask) / normalizer. `normalizer` defaults to the number of
    response tokens of this call; the learner must pass the GLOBAL number of response tokens of the whole
    mini-batch across all micro-batches and data-parallel ranks, so that summing the losses of every
    micro-batch and rank gives the global token mean. Gradient reduction across ranks must then SUM:
    FSDP2 averages by default, so scale the loss by the data-parallel world size (or set the gradient
    divide factor to 1).

    stats (detached scalars, token means over `mask` of this call): "clipfrac" (pg2 > pg1, the clipped
    branch taken), "dual_clipfrac" (A < 0 and the dual cap taken), "ratio_mean", "approx_kl"
    (0.5·(logprobs - old_logprobs)^2).

    Raises ValueError for mismatched shapes, clip_low outside [0, 1), clip_high < 0 or clip_c <= 1.
    """
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    check_same_shape("logprobs", logprobs, is_weights=is_weights)
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if clip_c <= 1:
        raise ValueError(f"clip_c (dual-clip constant) must be > 1, got {clip_c}")

    # Only `logprobs` carries gradient, whatever the caller passes for the other inputs.
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(pg1, pg2)
    cap = -advantages * clip_c
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(clipped, cap), clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = masked_mean(per_token, mask, normalizer)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).to(ratio.dtype), mask),
            "dual_clipfrac": masked_mean((negative & (clipped > cap)).to(ratio.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
        }
    return loss, stats
