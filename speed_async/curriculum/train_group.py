"""The record the orchestrator hands the learner: one prompt's complete group of responses, as trained on.

It sits below both (numpy only): the orchestrator builds it from a `RolloutGroup` off the wire, the learner
packs it into micro-batches, checkpoints save the ready ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TrainGroup:
    """One prompt's complete group of responses, as the learner trains on it."""

    prompt_id: int
    """Stable id of the prompt (its row in the data cursor)."""
    epoch: int
    """Pass over the data that produced this group."""
    data_source: str
    """Name of the prompt's source (for per-source metrics)."""
    prompt_token_ids: np.ndarray
    """int32 [P], P >= 1."""
    responses: list[np.ndarray]
    """One int32 [R_i] array per response, R_i >= 1."""
    behaviour_logprobs: list[np.ndarray]
    """float32 [R_i] per response: the sampler's log-probs of the sampled tokens (pi_behaviour)."""
    rewards: np.ndarray
    """float32 [n], one scalar reward per response."""
    version: int
    """Min policy version over the group's responses (screening included)."""

    def __post_init__(self) -> None:
        where = f"TrainGroup(prompt_id={self.prompt_id})"
        _check_array(f"{where}.prompt_token_ids", self.prompt_token_ids, np.int32)
        n = len(self.responses)
        if n < 1:
            raise ValueError(f"{where}.responses is empty; a group needs at least one response")
        if len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"{where}.behaviour_logprobs has {len(self.behaviour_logprobs)} arrays; allowed: one per response ({n})"
            )
        _check_array(f"{where}.rewards", self.rewards, np.float32)
        if self.rewards.shape != (n,):
            raise ValueError(f"{where}.rewards has shape {self.rewards.shape}; allowed: ({n},), one per response")
        for i, (tokens, logprobs) in enumerate(zip(self.responses, self.behaviour_logprobs, strict=True)):
            _check_array(f"{where}.responses[{i}]", tokens, np.int32)
            _check_array(f"{where}.behaviour_logprobs[{i}]", logprobs, np.float32)
            if logprobs.shape != tokens.shape:
                raise ValueError(
                    f"{where}.behaviour_logprobs[{i}] has shape {logprobs.shape}; allowed: the response's "
                    f"shape {tokens.shape}"
                )


def _check_array(name: str, value: object, dtype: type) -> None:
    """Raise ValueError unless `value` is a non-empty 1-D numpy array of `dtype`."""
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != 1 or value.size == 0:
        got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"{name} is {got}; allowed: a non-empty 1-D numpy {np.dtype(dtype).name} array")
