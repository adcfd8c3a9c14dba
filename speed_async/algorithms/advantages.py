"""Group-relative advantage estimators (RLOO, GRPO) and their broadcast to response tokens.

A group is the N responses to one prompt with scalar rewards r_1..r_N (SPEED.md, "Base algorithms").
Both estimators are shift-invariant, so each group is shifted by its first reward before the mean is taken:
the result is the same in exact arithmetic, and a group whose rewards are all equal gets advantages that are
exactly 0 in floating point too (without the shift, 16 rewards of 0.7 in float32 give GRPO advantages of
about 0.06, because mean and std pick up rounding error that the 1e-6 epsilon then amplifies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

Estimator = Literal["rloo", "grpo"]


def _check_rewards(rewards: Tensor, name: str) -> None:
    """Raise ValueError unless `rewards` is a float [num_groups, group_size] tensor with group_size >= 2."""
    if rewards.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {rewards.dtype}")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"{name} has group_size {rewards.shape[1]} (shape {tuple(rewards.shape)}); "
            "group-relative advantages need group_size >= 2"
        )


def _centered(rewards: Tensor) -> Tensor:
    """r_i - mean(r) per group (row), computed after shifting each row by its first element."""
    shifted = rewards - rewards[:, :1]
    return shifted - shifted.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO (leave-one-out) advantages: A_i = r_i - mean_{j != i} r_j = N/(N-1) · (r_i - mean(r)).

    `rewards` is `[num_groups, group_size]`; the result has the same shape. No std normalisation.
    Raises ValueError for a non-2-D or integer tensor, or group_size < 2.
    """
    _check_rewards(rewards, "rewards")
    n = rewards.shape[1]
    return _centered(rewards) * (n / (n - 1))


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: A_i = (r_i - mean(r)) / (std(r) + eps), with the unbiased (N-1) std per group.

    `rewards` is `[num_groups, group_size]`; the result has the same shape. A group whose rewards are all
    equal gets zeros. Raises ValueError for a non-2-D or integer tensor, group_size < 2 or eps < 0.
    """
    _check_rewards(rewards, "rewards")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    centered = _centered(rewards)
    std = centered.std(dim=1, correction=1, keepdim=True)
    return centered / (std + eps)


_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"rloo": rloo_advantages, "grpo": grpo_advantages}


def group_advantages(rewards: Sequence[Tensor], estimator: Estimator) -> list[Tensor]:
    """Apply `estimator` to each group separately; groups may differ in size (e.g. SPEED 24 beside DAPO 16).

    `rewards[k]` is the 1-D `[group_size_k]` reward vector of group k; the result is a list of tensors of the
    same shapes. Raises ValueError for an unknown estimator, or a group that is not 1-D, is not floating
    point, or has fewer than 2 responses (the message names the group's index).
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}")
    fn = _ESTIMATORS[estimator]
    out = []
    for k, group in enumerate(rewards):
        if group.ndim != 1:
            raise ValueError(f"rewards[{k}] must be 1-D [group_size], got shape {tuple(group.shape)}")
        _check_rewards(group.unsqueeze(0), f"rewards[{k}]")
        out.append(fn(group.unsqueeze(0)).squeeze(0))
    return out


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Spread one advantage per sequence over its response tokens: `[batch]` -> `[batch, response_len]`.

    Tokens where `mask` is 0 get 0. Raises ValueError when `advantages` is not 1-D, `mask` is not 2-D, or
    their batch sizes differ.
    """
    if advantages.ndim != 1:
        raise ValueError(f"advantages must be 1-D [batch], got shape {tuple(advantages.shape)}")
    if mask.ndim != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"mask must be [batch, response_len] with batch = {advantages.shape[0]} "
            f"(advantages shape {tuple(advantages.shape)}), got shape {tuple(mask.shape)}"
        )
    return advantages.unsqueeze(1) * mask.to(advantages.dtype)


__all__ = [
    "Estimator",
    "broadcast_to_tokens",
    "group_advantages",
    "grpo_advantages",
    "rloo_advantages",
]
