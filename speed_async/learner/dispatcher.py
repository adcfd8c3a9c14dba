"""The dispatcher: learner rank 0's thread that owns the sockets, the curriculum state and the ledger.

```
  samplers ──Hello/WorkRequest/Heartbeat/SyncDone──► ROUTER ─┐
  samplers ──ScreenReport/RolloutGroup/GroupDropped/ ► PULL ──┤  dispatcher thread (this module)
             EvalResult                                      │   DispatchState: cursor, in flight, ready FIFO
  train loop ──commands (batch for step s, update v,  ──────►│   Ledger, sampler liveness, eval tallies
               published v, eval v, stop)                    │
  train loop ◄──batches, eval accuracies, errors ────────────┘
```
The train loop never touches a socket: it asks for the batch of step s and waits on a queue with a timeout,
so receiving and dispatching never stall a train step. What bounds the lag: `DispatchState.room` paces the
hand-out and `DispatchState.take_batch` checks step - version <= k for every group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from speed_async.config import Config
from speed_async.curriculum.dispatch import DispatchState, Key
from speed_async.data.prepare import Prompt
from speed_async.learner.batch import TrainGroup
from speed_async.learner.ledger import Ledger
from speed_async.protocol import (
    EvalAssignment,
    EvalResult,
    GroupDropped,
    Heartbeat,
    Hello,
    JoinSyncGroup,
    Message,
    NoWork,
    RolloutGroup,
    ScreenReport,
    Shutdown,
    SyncDone,
    UpdateWeights,
    WorkAssignment,
    WorkItem,
    WorkRequest,
)
from speed_async.transport import Context, PullSocket, RouterSocket

log = logging.getLogger("speed_async.dispatcher")
NO_WORK_RETRY_S = 0.2


@dataclass
class SamplerInfo:
    """What the dispatcher knows of one sampler."""

    identity: bytes
    version: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    alive: bool = True


class DispatcherError(RuntimeError):
    """Raised in the train loop when the dispatcher thread failed or a wait timed out."""


def to_train_group(msg: RolloutGroup) -> TrainGroup:
    """Wire message -> the learner's group (arrays copied out of the receive buffer)."""
    responses = list(msg.responses())
    return TrainGroup(
        prompt_id=msg.prompt_id,
        epoch=msg.epoch,
        data_source=msg.data_source,
        prompt_token_ids=np.array(msg.prompt_token_ids, dtype=np.int32),
        responses=[np.array(r.token_ids, dtype=np.int32) for r in responses],
        behaviour_logprobs=[np.array(r.logprobs, dtype=np.float32) for r in responses],
        rewards=np.array(msg.rewards, dtype=np.float32),
        version=msg.group_version,
    )


class Dispatcher:
    """Runs in a daemon thread on learner rank 0; the train loop talks to it through thread-safe methods."""

    def __init__(
        self,
        config: Config,
        train_prompts: Sequence[Prompt],
        eval_prompts: Sequence[Prompt],
        ledger: Ledger,
        *,
        key: bytes | None,
        sync_master: tuple[str, int],
    ) -> None:
        self.config = config
        self.prompts = train_prompts
        self.eval_prompts = eval_prompts
        self.ledger = ledger
        self.sync_master = sync_master
        mode = config.curriculum.mode
        self.state: DispatchState[TrainGroup] = DispatchState(
            len(train_prompts),
            seed=config.trainer.seed,
            train_batch_size=config.data.train_batch_size,
            max_staleness=config.pipeline.max_staleness,
            mode=mode,
        )
        self.ctx = Context()
        max_bytes = config.pipeline.max_message_bytes
        self.router = RouterSocket(self.ctx, key=key, max_bytes=max_bytes)
        self.pull = PullSocket(self.ctx, key=key, max_bytes=max_bytes)
        host, port = config.cluster.bind_host, config.cluster.base_port
        self.work_endpoint = self.router.bind_endpoint(host, port)
        self.results_endpoint = self.pull.bind_endpoint(host, port + 1 if port else 0)
        self.samplers: dict[int, SamplerInfo] = {}
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._batches: queue.Queue[list[TrainGroup]] = queue.Queue()
        self._evals: queue.Queue[tuple[int, dict[str, float]]] = queue.Queue()
        self._snapshots: queue.Queue[dict[str, Any]] = queue.Queue()
        self.min_work_version = 0  # a resumed run hands out no work to samplers below the restored version
        self._wanted_step: int | None = None
        self._eval_tally: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._eval_expected: dict[int, int] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.counters: Counter[str] = Counter()
        # Latest gauges from the samplers; keys fixed here so the train loop can read it while this thread writes.
        self.step_stats: dict[str, float] = {"weight_sync/reload_seconds": float("nan")}
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    # ---- train-loop side (thread-safe) -------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (sockets are already bound)."""
        self._thread.start()

    def _check(self) -> None:
        if self._error is not None:
            raise DispatcherError(f"dispatcher thread failed: {self._error!r}") from self._error

    def wait_for_samplers(self, timeout_s: float) -> None:
        """Block until every configured sampler said Hello; the error names the missing ones."""
        deadline = time.monotonic() + timeout_s
        want = self.config.cluster.num_samplers
        while len(self.samplers) < want:
            self._check()
            if time.monotonic() > deadline:
                missing = sorted(set(range(want)) - set(self.samplers))
                raise DispatcherError(
                    f"samplers {missing} did not say hello at {self.work_endpoint} within {timeout_s:.0f} s"
                )
            time.sleep(0.05)

    def next_batch(self, step: int, timeout_s: float) -> list[TrainGroup]:
        """The groups of RL step `step`; raises DispatcherError naming the samplers if none come in time."""
        self._commands.put(("batch", step))
        deadline = time.monotonic() + timeout_s
        while True:
            self._check()
            try:
                return self._batches.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    alive = sorted(i for i, s in self.samplers.items() if s.alive)
                    raise DispatcherError(
                        f"no batch for step {step} within {timeout_s:.0f} s: samplers {alive} delivered "
                        f"{len(self.state.ready)} of {self.config.data.train_batch_size} usable groups"
                    ) from None

    def announce_update(self, version: int, generation: int, num_buckets: int) -> None:
        """Tell every sampler that weights `version` follow on the sync group (before broadcasting)."""
        self._commands.put(("update", version, generation, num_buckets))

    def mark_published(self, version: int) -> None:
        """Every sampler now holds weights `version`."""
        self._commands.put(("published", version))

    def request_eval(self, version: int) -> None:
        """Evaluate the held-out prompts on weights `version` (spread over the samplers)."""
        self._commands.put(("eval", version))

    def poll_eval(self, timeout_s: float = 0.0) -> tuple[int, dict[str, float]] | None:
        """A finished evaluation (version, {data_source: accuracy}), if any."""
        self._check()
        try:
            return self._evals.get(timeout=timeout_s) if timeout_s > 0 else self._evals.get_nowait()
        except queue.Empty:
            return None

    def join_sync_group(self, generation: int, timeout_s: float) -> None:
        """Ask every sampler to join weight-sync group `generation` (learner rank 0 is its rank 0)."""
        self._commands.put(("join", generation, timeout_s))

    def snapshot(self, timeout_s: float) -> dict[str, Any]:
        """A consistent checkpoint snapshot, taken inside the dispatcher thread: `dispatch`
        (`DispatchState.state_dict()`), `ready` (the groups of the ready FIFO, in order), `counters` and
        `ledger_offset` (ledger.jsonl's size at that moment)."""
        self._commands.put(("snapshot",))
        deadline = time.monotonic() + timeout_s
        while True:
            self._check()
            try:
                return self._snapshots.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise DispatcherError(f"the dispatcher thread took no snapshot within {timeout_s:.0f} s") from None

    def restore(
        self, dispatch: dict[str, Any], ready: list[TrainGroup], counters: dict[str, int], version: int
    ) -> list[Key]:
        """Load a snapshot before `start()`; no work goes to a sampler below `version` (the restored weights).
        Returns the keys that were in flight: they are handed out again first (ledger `reissued`)."""
        assert not self._thread.is_alive(), "restore() before start()"
        keyed = [((g.epoch, g.prompt_id), g) for g in ready]
        if [list(k) for k, _ in keyed] != [list(k) for k in dispatch["ready_keys"]]:
            raise ValueError("checkpoint is inconsistent: the saved ready groups do not match the saved ready keys")
        self.state.load_state_dict(dispatch, keyed)
        self.counters = Counter(counters)
        self.min_work_version = version
        for epoch, pid in self.state.reissue:
            self.ledger.write("reissued", pid, epoch, reason="resume")
        return list(self.state.reissue)

    def stop(self, reason: str) -> None:
        """Tell the samplers to stop, then end the thread."""
        self._commands.put(("stop", reason))
        self._thread.join(timeout=10)
        self.router.close()
        self.pull.close()
        self.ctx.close()

    # ---- dispatcher thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._serve_commands()
                got = self._serve_sockets()
                self._check_liveness()
                if not got:
                    time.sleep(0.002)
        except BaseException as err:  # surfaced to the train loop by _check()
            log.exception("dispatcher thread failed")
            self._error = err

    def _serve_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            kind = cmd[0]
            if kind == "batch":
                self._wanted_step = cmd[1]
            elif kind == "update":
                _, version, generation, buckets = cmd
                for info in self._live():
                    self.router.send_to(
                        info.identity, UpdateWeights(version=version, generation=generation, num_buckets=buckets)
                    )
            elif kind == "published":
                self.state.published(cmd[1])
            elif kind == "eval":
                self._send_eval(cmd[1])
            elif kind == "join":
                self._send_join(cmd[1], cmd[2])
            elif kind == "snapshot":
                self._snapshots.put(
                    {
                        "dispatch": self.state.state_dict(),
                        "ready": [g for _, g in self.state.ready],
                        "counters": dict(self.counters),
                        "ledger_offset": self.ledger.offset(),
                    }
                )
            elif kind == "stop":
                for info in self._live():
                    self.router.send_to(info.identity, Shutdown(reason=cmd[1]))
                self._stop.set()
        self._try_batch()

    def live_samplers(self) -> list[int]:
        """Ids of the samplers currently considered alive."""
        return sorted(i for i, s in list(self.samplers.items()) if s.alive)

    def _live(self) -> list[SamplerInfo]:
        return [s for _, s in sorted(self.samplers.items()) if s.alive]

    def _send_join(self, generation: int, timeout_s: float) -> None:
        live = self._live()
        addr, port = self.sync_master
        for rank, info in enumerate(live, start=1):
            msg = JoinSyncGroup(
                generation=generation,
                master_addr=addr,
                master_port=port,
                world_size=len(live) + 1,
                rank=rank,
                timeout_s=timeout_s,
            )
            self.router.send_to(info.identity, msg)

    def _send_eval(self, version: int) -> None:
        live = self._live()
        if not self.eval_prompts:
            return
        n = self.config.trainer.eval_n
        self._eval_expected[version] = len(self.eval_prompts)
        for s, info in enumerate(live):
            items = [
                WorkItem(
                    prompt_id=i,
                    epoch=0,
                    data_source=p.data_source,
                    prompt_token_ids=p.token_ids,
                    ground_truth=p.ground_truth,
                    num_screen=n,
                    num_continue=0,
                )
                for i, p in enumerate(self.eval_prompts)
                if i % len(live) == s
            ]
            if items:
                self.router.send_to(info.identity, EvalAssignment(items=items, version=version))

    def _try_batch(self) -> None:
        step = self._wanted_step
        if step is None:
            return
        batch, stale = self.state.take_batch(step)
        for (epoch, pid), group in stale:
            self.ledger.write("dropped", pid, epoch, reason="stale", step=step, version=group.version)
        if batch is None:
            return
        for (epoch, pid), group in batch:
            self.ledger.write("trained", pid, epoch, step=step, lag=step - group.version, version=group.version)
        self._wanted_step = None
        self._batches.put([g for _, g in batch])

    def _serve_sockets(self) -> bool:
        got = False
        for _ in range(256):
            item = self.router.recv(0.0)
            if item is None:
                break
            got = True
            self._on_control(*item)
        for _ in range(256):
            msg = self.pull.recv(0.0)
            if msg is None:
                break
            got = True
            self._on_result(msg)
        if got:
            self._try_batch()
        return got

    def _touch(self, sampler_id: int, version: int | None = None) -> SamplerInfo | None:
        info = self.samplers.get(sampler_id)
        if info is None or not info.alive:
            self.counters["messages_from_unknown_samplers"] += 1
            return None
        info.last_seen = time.monotonic()
        if version is not None:
            info.version = version
        return info

    def _on_control(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, Hello):
            if msg.sampler_id >= self.config.cluster.num_samplers:
                self.counters["bad_hello"] += 1
                log.warning("hello from sampler id %d outside the configured range", msg.sampler_id)
                return
            self.samplers[msg.sampler_id] = SamplerInfo(identity=identity)
            log.info("sampler %d (pid %d on %s) connected", msg.sampler_id, msg.pid, msg.hostname)
        elif isinstance(msg, WorkRequest):
            info = self._touch(msg.sampler_id, msg.version)
            if info is None:
                return
            if msg.version < self.min_work_version:
                self.router.send_to(identity, NoWork(retry_after_s=NO_WORK_RETRY_S, reason="restored weights pending"))
                return
            keys = self.state.assign(msg.sampler_id, msg.version, msg.max_prompts)
            if not keys:
                self.router.send_to(identity, NoWork(retry_after_s=NO_WORK_RETRY_S, reason="staleness bound"))
                return
            self.router.send_to(identity, WorkAssignment(items=self._items(keys), version=self.state.version))
            for epoch, pid in keys:
                self.ledger.write("dispatched", pid, epoch, sampler=msg.sampler_id, version=msg.version)
        elif isinstance(msg, Heartbeat):
            self._touch(msg.sampler_id, msg.version)
        elif isinstance(msg, SyncDone):
            if self._touch(msg.sampler_id, msg.version) is not None:
                self.step_stats["weight_sync/reload_seconds"] = msg.seconds
        else:
            self.counters[f"unexpected_{type(msg).__name__}"] += 1

    def _items(self, keys: Sequence[Key]) -> list[WorkItem]:
        mode, rollout = self.config.curriculum.mode, self.config.rollout
        items = []
        for epoch, pid in keys:
            p = self.prompts[pid]
            items.append(
                WorkItem(
                    prompt_id=pid,
                    epoch=epoch,
                    data_source=p.data_source,
                    prompt_token_ids=p.token_ids,
                    ground_truth=p.ground_truth,
                    num_screen=rollout.n,
                    num_continue=rollout.n_continue if mode == "speed" else 0,
                )
            )
        return items

    def _on_result(self, msg: Message) -> None:
        if isinstance(msg, ScreenReport):
            if self._touch(msg.sampler_id) is None:
                return
            key = (msg.epoch, msg.prompt_id)
            if self.state.on_screened(key, msg.qualified):
                pass_rate = float(np.mean(msg.rewards))
                self.ledger.write("screened", msg.prompt_id, msg.epoch, pass_rate=pass_rate, version=msg.version)
                event = "qualified" if msg.qualified else "rejected"
                self.ledger.write(event, msg.prompt_id, msg.epoch, sampler=msg.sampler_id)
        elif isinstance(msg, RolloutGroup):
            if self._touch(msg.sampler_id) is None:
                return
            self._validate_group(msg)
            key = (msg.epoch, msg.prompt_id)
            self.state.on_group(key, to_train_group(msg))
        elif isinstance(msg, GroupDropped):
            if self._touch(msg.sampler_id) is None:
                return
            if self.state.on_dropped((msg.epoch, msg.prompt_id)):
                self.ledger.write("dropped", msg.prompt_id, msg.epoch, reason=msg.reason, version=msg.version)
        elif isinstance(msg, EvalResult):
            if self._touch(msg.sampler_id) is None:
                return
            self._on_eval(msg)
        else:
            self.counters[f"unexpected_{type(msg).__name__}"] += 1

    def _validate_group(self, msg: RolloutGroup) -> None:
        expected = self.config.group_size
        if msg.num_responses != expected:
            # A sampler built with another config; the learner must not train on it.
            raise DispatcherError(
                f"sampler {msg.sampler_id} sent a group of {msg.num_responses} responses for prompt "
                f"{msg.prompt_id}; this run's groups have {expected}"
            )

    def _on_eval(self, msg: EvalResult) -> None:
        tally = self._eval_tally[msg.version]
        tally[msg.data_source].append(float(np.mean(msg.scores)))
        done = sum(len(v) for v in tally.values())
        if done >= self._eval_expected.get(msg.version, 1 << 62):
            accs = {source: float(np.mean(v)) for source, v in tally.items()}
            del self._eval_tally[msg.version]
            self._evals.put((msg.version, accs))

    def _check_liveness(self) -> None:
        now = time.monotonic()
        limit = self.config.pipeline.sampler_timeout_s
        for sampler_id, info in self.samplers.items():
            if info.alive and now - info.last_seen > limit:
                info.alive = False
                lost = self.state.sampler_lost(sampler_id)
                for epoch, pid in lost:
                    self.ledger.write("reissued", pid, epoch, sampler=sampler_id, reason="sampler silent")
                log.error(
                    "sampler %d silent for %.0f s: declared dead, %d prompts re-issued", sampler_id, limit, len(lost)
                )
        if self.samplers and not self._live():
            raise DispatcherError(f"every sampler is silent for over {limit:.0f} s (pipeline.sampler_timeout_s)")
