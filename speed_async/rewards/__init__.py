"""Rewards: Math-Verify and user reward functions by import path, scored with a real time limit in worker
processes; the Countdown scorer; DAPO's overlong penalty (no torch, no vllm).

``score_math`` (the scoring function itself) lives in ``speed_async.rewards.math_verify_reward`` and is
not imported here: importing Math-Verify (sympy) takes about a second, and only the workers need it.
"""

from speed_async.rewards.functions import (
    BUILTIN_FUNCTIONS,
    FAILURE_KINDS,
    InvalidReward,
    check_functions,
    check_result,
    effective_functions,
)
from speed_async.rewards.overlong import overlong_penalty
from speed_async.rewards.pool import (
    DEFAULT_SCORE_FN,
    RewardPool,
    WorkerStartupError,
    math_reward,
    score_batch,
)
from speed_async.rewards.stats import RewardItem, SourceStats

__all__ = [
    "BUILTIN_FUNCTIONS",
    "DEFAULT_SCORE_FN",
    "FAILURE_KINDS",
    "InvalidReward",
    "RewardItem",
    "RewardPool",
    "SourceStats",
    "WorkerStartupError",
    "check_functions",
    "check_result",
    "effective_functions",
    "math_reward",
    "overlong_penalty",
    "score_batch",
]
