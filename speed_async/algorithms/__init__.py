"""Pure tensor functions of the RL update: advantages, policy loss, KL penalty, off-policy weights.

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
from speed_async.algorithms.off_policy import truncated_importance_weights

__all__ = [
    "Estimator",
    "broadcast_to_tokens",
    "group_advantages",
    "grpo_advantages",
    "kl_loss",
    "low_var_kl",
    "masked_mean",
    "policy_loss",
    "rloo_advantages",
    "truncated_importance_weights",
]
