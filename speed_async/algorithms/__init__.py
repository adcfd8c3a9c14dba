"""Pure tensor functions of the RL update: advantages, policy loss, KL penalty, off-policy weights
(none, TIS, MIS, IcePop) and their ratio statistics.

No I/O, no config parsing, no process groups: the learner calls these with tensors it has assembled.
"""

from speed_async.algorithms.advantages import (
    Estimator,
    broadcast_to_tokens,
    group_advantages,
    grpo_advantages,
    rloo_advantages,
)
from speed_async.algorithms.kl import kl_loss, low_var_kl
from speed_async.algorithms.losses import masked_mean, policy_loss
from speed_async.algorithms.off_policy import (
    CORRECTIONS,
    Correction,
    histogram_quantiles,
    importance_weights,
    log_ratio_histogram,
    sequence_masked_weights,
    token_masked_weights,
    truncated_importance_weights,
)

__all__ = [
    "CORRECTIONS",
    "Correction",
    "Estimator",
    "broadcast_to_tokens",
    "group_advantages",
    "grpo_advantages",
    "histogram_quantiles",
    "importance_weights",
    "kl_loss",
    "log_ratio_histogram",
    "low_var_kl",
    "masked_mean",
    "policy_loss",
    "rloo_advantages",
    "sequence_masked_weights",
    "token_masked_weights",
    "truncated_importance_weights",
]
