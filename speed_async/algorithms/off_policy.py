"""Off-policy corrections for stale rollouts and engine/learner mismatch (ARCHITECTURE.md, "Off-policy correction").

Three policies meet in an asynchronous step: pi_behaviour generated the response (the sampler's weights,
possibly `lag` versions old, in the engine's numerics), pi_old is the learner's weights at the start of this
step (before the update), and pi_theta is being optimised. The PPO ratio pi_theta / pi_old handles the update;
a correction weights each response token by a function of the importance ratio rho_t = pi_old / pi_behaviour
of the sampled token (detached):

    none     w_t = 1
    tis      w_t = min(rho_t, cap)                                  truncated IS, per token
    mis      w_t = g_i  if low <= g_i <= high  else 0               g_i = exp(mean_t log rho_t) over response i:
                                                                    the geometric-mean sequence ratio, masked
                                                                    two-sided (a whole response in or out)
    icepop   w_t = rho_t  if low <= rho_t <= high  else 0           per-token masking outside a ratio band

A masked token contributes nothing to the loss but still counts in the token mean's denominator. The ratio
statistics of a step (quantiles, the KL estimate) come from `log_ratio_histogram` / `histogram_quantiles`:
a fixed-bin histogram of log rho adds up exactly across micro-batches and ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from speed_async.algorithms.losses import LOG_RATIO_LIMIT, check_same_shape

Correction = Literal["none", "tis", "mis", "icepop"]
CORRECTIONS: tuple[str, ...] = ("none", "tis", "mis", "icepop")
HISTOGRAM_LIMIT = 8.0
"""log rho is binned over [-HISTOGRAM_LIMIT, HISTOGRAM_LIMIT]; values beyond land in the end bins."""
HISTOGRAM_BIN = 1e-3
"""Bin width of the log-ratio histogram: quantiles are exact to half a bin (ratios to about 0.05%)."""
NUM_BINS = round(2 * HISTOGRAM_LIMIT / HISTOGRAM_BIN) + 1


def _log_ratio(old_logprobs: Tensor, behaviour_logprobs: Tensor) -> Tensor:
    """log rho = old - behaviour, detached and clamped to +-LOG_RATIO_LIMIT (exp() stays finite)."""
    return (old_logprobs.detach() - behaviour_logprobs.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _check_band(name: str, low: float, high: float) -> None:
    if not 0 < low <= 1 <= high:
        raise ValueError(f"{name} band [{low}, {high}] is invalid: need 0 < low <= 1 <= high")


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
    return torch.exp(_log_ratio(old_logprobs, behaviour_logprobs)).clamp(max=cap)


def sequence_masked_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, low: float, high: float
) -> Tensor:
    """MIS: per response (row), g = exp(mean of log rho over its response tokens); every token of the row gets
    weight g when low <= g <= high, else 0. Detached, `[batch, response_len]`; a row without response tokens
    gets g = 1. Raises ValueError for mismatched shapes or a band that does not hold 1."""
    check_same_shape("old_logprobs", old_logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask)
    _check_band("MIS", low, high)
    log_ratio = _log_ratio(old_logprobs, behaviour_logprobs)
    mask = mask.detach().to(log_ratio.dtype)
    mean_log = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    geometric = torch.exp(mean_log)
    kept = (geometric >= low) & (geometric <= high)
    return torch.where(kept, geometric, torch.zeros_like(geometric)).unsqueeze(-1).expand_as(log_ratio)


def token_masked_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, low: float, high: float) -> Tensor:
    """IcePop: per token, weight rho when low <= rho <= high, else 0. Detached, `[batch, response_len]`. Raises
    ValueError for mismatched shapes or a band that does not hold 1."""
    check_same_shape("old_logprobs", old_logprobs, behaviour_logprobs=behaviour_logprobs)
    _check_band("IcePop", low, high)
    ratio = torch.exp(_log_ratio(old_logprobs, behaviour_logprobs))
    return torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))


def importance_weights(
    correction: Correction,
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    *,
    tis_cap: float = 2.0,
    mis_band: tuple[float, float] = (0.8, 1.25),
    icepop_band: tuple[float, float] = (0.5, 5.0),
) -> Tensor | None:
    """The per-token weights of `correction` (see the module docstring), detached; None for "none"."""
    if correction == "none":
        return None
    if correction == "tis":
        return truncated_importance_weights(old_logprobs, behaviour_logprobs, tis_cap)
    if correction == "mis":
        return sequence_masked_weights(old_logprobs, behaviour_logprobs, mask, *mis_band)
    if correction == "icepop":
        return token_masked_weights(old_logprobs, behaviour_logprobs, *icepop_band)
    raise ValueError(f"correction must be one of {list(CORRECTIONS)}, got {correction!r}")


def log_ratio_histogram(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Counts of log rho of the response tokens (`mask` > 0) in NUM_BINS bins of width HISTOGRAM_BIN centred on
    -HISTOGRAM_LIMIT .. +HISTOGRAM_LIMIT (outside values in the end bins); float64 [NUM_BINS], on the inputs'
    device. Histograms of micro-batches and ranks add up."""
    check_same_shape("old_logprobs", old_logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask)
    log_ratio = (old_logprobs.detach() - behaviour_logprobs.detach()).double()[mask > 0]
    index = torch.round((log_ratio.clamp(-HISTOGRAM_LIMIT, HISTOGRAM_LIMIT) + HISTOGRAM_LIMIT) / HISTOGRAM_BIN)
    histogram = torch.zeros(NUM_BINS, dtype=torch.float64, device=log_ratio.device)
    return histogram.index_add_(0, index.long(), torch.ones_like(log_ratio))


def histogram_quantiles(histogram: Tensor, quantiles: tuple[float, ...]) -> list[float]:
    """The ratios rho (not log rho) at `quantiles` of a `log_ratio_histogram`: for quantile q the centre of the
    first bin whose cumulative count reaches q * total (lower quantile), exponentiated. NaN for an empty one."""
    total = float(histogram.sum())
    if total <= 0:
        return [float("nan")] * len(quantiles)
    cumulative = torch.cumsum(histogram, 0)
    out = []
    for q in quantiles:
        if not 0 <= q <= 1:
            raise ValueError(f"quantile {q} is invalid: allowed 0 <= q <= 1")
        index = int(torch.searchsorted(cumulative, torch.tensor(max(q * total, 1e-9), dtype=cumulative.dtype)))
        out.append(float(torch.exp(torch.tensor(index * HISTOGRAM_BIN - HISTOGRAM_LIMIT, dtype=torch.float64))))
    return out
