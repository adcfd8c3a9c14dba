"""Rewards: Math-Verify scoring with a real time limit, and DAPO's overlong penalty (no torch, no vllm).

``score_math`` (the scoring function itself) lives in ``speed_async.rewards.math_verify_reward`` and is
not imported here: importing Math-Verify (sympy) takes about a second, and only the workers need it.
"""

from speed_async.rewards.overlong import overlong_penalty
from speed_async.rewards.pool import (
    DEFAULT_SCORE_FN,
    RewardPool,
    WorkerStartupError,
    math_reward,
    score_batch,
)

__all__ = [
    "DEFAULT_SCORE_FN",
    "RewardPool",
    "WorkerStartupError",
    "math_reward",
    "overlong_penalty",
    "score_batch",
]
