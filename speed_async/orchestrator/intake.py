"""The orchestrator's training books: sampler results in, RL-step batches out, every prompt's fate in the ledger.

`TrainingBooks` runs inside the dispatcher thread (`speed_async.orchestrator.dispatcher`), which owns the
sockets and hands it each validated result. It keeps the `DispatchState` (what is handed out, in flight,
ready) and writes the ledger line for each event: `screened` / `qualified` / `rejected`, `dropped` (a
group with no reward variance, or one that came back beyond the bound: reason `stale`), `reissued` (a
prompt a sampler gave back unfinished, or lost), and `trained` once the train loop took the batch of a step.
Per data source it keeps a `SourceBook` (screening, trained batches, the samplers' reward stats).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from speed_async.config import Config
from speed_async.curriculum.dispatch import DispatchState, Key
from speed_async.curriculum.train_group import TrainGroup
from speed_async.data.prepare import Prompt
from speed_async.orchestrator.ledger import Ledger
from speed_async.orchestrator.sources import SourceBook
from speed_async.orchestrator.wire import to_train_group, work_items
from speed_async.protocol import GroupDropped, RewardStats, RolloutGroup, ScreenReport, WorkItem

log = logging.getLogger("speed_async.dispatcher")
SOURCE_COUNTS = "sources:"
"""Prefix of the SourceBook's counts among the counters a checkpoint saves."""
RETURNED = ("aborted", "stale_in_flight", "no_decision")
"""GroupDropped reasons of a prompt a sampler returns unfinished (its requests aborted by a weight update,
beyond the bound before they finished, or a qualified screen that got no `ContinueDecision` in time): re-issued,
not counted as dropped."""


class TrainingBooks:
    """DispatchState + ledger + counters, driven by the dispatcher thread only."""

    def __init__(self, config: Config, prompts: Sequence[Prompt], ledger: Ledger) -> None:
        self.config, self.prompts, self.ledger = config, prompts, ledger
        self.state: DispatchState[TrainGroup] = DispatchState(
            len(prompts),
            seed=config.trainer.seed,
            train_batch_size=config.data.train_batch_size,
            max_staleness=config.pipeline.max_staleness,
            mode=config.curriculum.mode,
        )
        self.counters: Counter[str] = Counter()
        self.sources = SourceBook(p.data_source for p in prompts)
        self._offered: tuple[int, list[tuple[Key, TrainGroup]]] | None = None  # taken, not yet consumed

    # ---- hand-out ----------------------------------------------------------------------------------------
    def assign(self, sampler_id: int, version: int, max_prompts: int) -> tuple[list[Key], list[WorkItem]]:
        """Work for a sampler at weights `version`: the keys taken and their wire items (none: bound reached)."""
        keys = self.state.assign(sampler_id, version, max_prompts)
        return keys, (work_items(self.prompts, keys, self.config) if keys else [])

    def dispatched(self, keys: Sequence[Key], sampler_id: int, version: int) -> None:
        """The assignment of `keys` reached the sampler."""
        for epoch, pid in keys:
            self.ledger.write("dispatched", pid, epoch, sampler=sampler_id, version=version)

    def give_back(self, keys: Sequence[Key]) -> None:
        """The assignment of `keys` could not be sent: they go out again."""
        for key in keys:
            self.state.give_back(key)

    # ---- results -----------------------------------------------------------------------------------------
    def on_screen(self, msg: ScreenReport) -> bool | None:
        """Book a screening result; for a qualified prompt return whether its sampler continues it (True) or
        drops its screen (False: the prompt goes out again later, ledger `reissued`); None otherwise."""
        decision = self.state.on_screened((msg.epoch, msg.prompt_id), msg.qualified, msg.version)
        if decision == "ignored":
            return None
        pass_rate = float(np.mean(msg.rewards))
        self.ledger.write("screened", msg.prompt_id, msg.epoch, pass_rate=pass_rate, version=msg.version)
        event = "qualified" if msg.qualified else "rejected"
        self.ledger.write(event, msg.prompt_id, msg.epoch, sampler=msg.sampler_id)
        self.sources.screened(self.prompts[msg.prompt_id].data_source, msg.qualified)
        if decision == "declined":
            reason = "continuation declined"
            self.ledger.write("reissued", msg.prompt_id, msg.epoch, sampler=msg.sampler_id, reason=reason)
        return None if decision == "rejected" else decision == "go"

    def on_group(self, msg: RolloutGroup) -> bool:
        """Take a complete group; False for one of the wrong size (rejected, its prompt re-issued)."""
        key = (msg.epoch, msg.prompt_id)
        if msg.num_responses != self.config.group_size:
            # A sampler built with another config: never trained on; the prompt goes to another sampler.
            sizes = (msg.sampler_id, msg.num_responses, msg.prompt_id, self.config.group_size)
            log.error("sampler %d sent %d responses for prompt %d; groups have %d: rejected", *sizes)
            self.reissue(key, msg.sampler_id, "bad group")
            return False
        if self.state.on_group(key, to_train_group(msg)):
            if self.config.curriculum.mode != "speed":
                self.sources.screened(msg.data_source, True)
            self.counters["responses"] += msg.num_responses
            # Responses whose tokens came from more than one version (weights loaded while they ran).
            self.counters["responses_spanning_versions"] += int((msg.version_max > msg.version_min).sum())
        return True

    def on_dropped(self, msg: GroupDropped) -> None:
        key = (msg.epoch, msg.prompt_id)
        if msg.reason in RETURNED:  # the sampler gave the prompt up unfinished: it goes out again first
            self.reissue(key, msg.sampler_id, msg.reason)
        elif self.state.on_dropped(key):
            self.ledger.write("dropped", msg.prompt_id, msg.epoch, reason=msg.reason, version=msg.version)
            self.sources.screened(self.prompts[msg.prompt_id].data_source, False)

    def on_reward_stats(self, msg: RewardStats) -> None:
        self.sources.on_reward_stats(msg)

    def reissue(self, key: Key, sampler_id: int, reason: str) -> None:
        """Hand the in-flight prompt `key` out again first (ledger `reissued`); nothing if it is not in flight."""
        if self.state.give_back(key):
            self.ledger.write("reissued", key[1], key[0], sampler=sampler_id, reason=reason)

    def sampler_lost(self, sampler_id: int) -> int:
        """Re-issue a lost sampler's in-flight prompts first; returns how many."""
        lost = self.state.sampler_lost(sampler_id)
        for epoch, pid in lost:
            self.ledger.write("reissued", pid, epoch, sampler=sampler_id, reason="sampler lost")
        return len(lost)

    # ---- batches -----------------------------------------------------------------------------------------
    def take_batch(self, step: int) -> list[TrainGroup] | None:
        """The groups of `step` if enough are ready (offered until `consumed` or `cancel`); stale ones dropped."""
        batch, stale = self.state.take_batch(step)
        for (epoch, pid), group in stale:
            self.ledger.write("dropped", pid, epoch, reason="stale", step=step, version=group.version)
        if batch is None:
            return None
        self._offered = (step, batch)
        return [g for _, g in batch]

    def consumed(self, step: int) -> None:
        """The train loop took the batch of `step`: from now on it is trained (ledger `trained`)."""
        assert self._offered is not None and self._offered[0] == step, (self._offered, step)
        for (epoch, pid), group in self._offered[1]:
            self.ledger.write("trained", pid, epoch, step=step, lag=step - group.version, version=group.version)
        self.sources.trained([g for _, g in self._offered[1]])
        self._offered = None

    def cancel(self, step: int) -> None:
        """The train loop gave up `step`: nothing was trained; a batch taken for it goes back."""
        if self._offered is not None and self._offered[0] == step:
            self.state.untake(self._offered[1])
            self._offered = None

    # ---- checkpoints -------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """`dispatch`, `ready` (the ready groups in order), `counters`, `ledger_offset` (see Dispatcher.snapshot)."""
        return {
            "dispatch": self.state.state_dict(),
            "ready": [g for _, g in self.state.ready],
            "counters": {**self.counters, **{SOURCE_COUNTS + k: v for k, v in self.sources.counts.items()}},
            "ledger_offset": self.ledger.offset(),
        }

    def restore(self, dispatch: dict[str, Any], ready: list[TrainGroup], counters: dict[str, int]) -> list[Key]:
        """Load a snapshot; returns the keys that were in flight (ledger `reissued`, handed out again first)."""
        keyed = [((g.epoch, g.prompt_id), g) for g in ready]
        if [list(k) for k, _ in keyed] != [list(k) for k in dispatch["ready_keys"]]:
            raise ValueError("checkpoint is inconsistent: the saved ready groups do not match the saved ready keys")
        self.state.load_state_dict(dispatch, keyed)
        self.counters = Counter({k: v for k, v in counters.items() if not k.startswith(SOURCE_COUNTS)})
        self.sources.counts = Counter(
            {k.removeprefix(SOURCE_COUNTS): v for k, v in counters.items() if k.startswith(SOURCE_COUNTS)}
        )
        for epoch, pid in self.state.reissue:
            self.ledger.write("reissued", pid, epoch, reason="resume")
        return list(self.state.reissue)
