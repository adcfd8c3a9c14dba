"""The order prompts are drawn in: one seeded permutation per epoch, and the resumable cursor over it.

The dispatcher owns one `PromptCursor`; its `state_dict` goes into the checkpoint, so a resumed run draws
exactly the prompts an uninterrupted run would have drawn, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def epoch_permutation(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(num_prompts)`` that depends only on ``(seed, epoch)``.

    Drawn from ``numpy.random.Generator(PCG64(SeedSequence([seed, epoch])))``, so each epoch has its own
    order and the same ``(seed, epoch)`` gives the same order on any machine and numpy version that keeps
    PCG64's stream.
    """
    for name, value in (("num_prompts", num_prompts), ("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_prompts).tolist()


class PromptCursor:
    """Walks the prompts epoch after epoch, each epoch in its own `epoch_permutation` order.

    The state is ``(epoch, position)``: ``position`` prompts of ``epoch`` have been drawn. After the last
    prompt of an epoch the cursor stays at ``position == num_prompts`` (so `peek_remaining_in_epoch` is
    empty and the caller can see the epoch end) until the next `next` call starts the following epoch.
    """

    def __init__(self, num_prompts: int, seed: int) -> None:
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = epoch_permutation(num_prompts, seed, 0)

    def next(self) -> tuple[int, int]:
        """Draw the next prompt: ``(epoch, prompt index)``, moving to the next epoch at the end of one."""
        if self.position == self.num_prompts:
            self._start_epoch(self.epoch + 1, 0)
        index = self._order[self.position]
        self.position += 1
        return self.epoch, index

    def peek_remaining_in_epoch(self) -> list[int]:
        """The prompt indices still to be drawn in the current epoch, in order, without drawing them."""
        return self._order[self.position :]

    def state_dict(self) -> dict[str, int]:
        """The cursor's state; `load_state_dict` on a cursor over the same data continues from it."""
        return {
            "num_prompts": self.num_prompts,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; it must come from a cursor with the same ``num_prompts`` and ``seed``."""
        for name in ("num_prompts", "seed"):
            saved, own = state.get(name), getattr(self, name)
            if saved != own:
                raise ValueError(
                    f"cursor state has {name}={saved!r} but this cursor has {own!r}; "
                    "resuming needs the same data and seed"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"cursor state epoch must be an integer >= 0, got {epoch!r}")
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= self.num_prompts:
            raise ValueError(f"cursor state position must be an integer in [0, {self.num_prompts}], got {position!r}")
        self._start_epoch(epoch, position)

    def _start_epoch(self, epoch: int, position: int) -> None:
        self._order = epoch_permutation(self.num_prompts, self.seed, epoch)
        self.epoch = epoch
        self.position = position
