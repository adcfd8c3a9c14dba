"""The sampler process: keeps one vLLM engine busy screening, continuing and scoring prompts.

```
    dispatcher (ROUTER) ──WorkAssignment / NoWork / UpdateWeights / EvalAssignment / Shutdown──►┐
        ▲                                                                                        │
        └──Hello, WorkRequest, Heartbeat, SyncDone (DEALER)──── sampler loop ◄───────────────────┘
                                                                 │  one generation call =
                                                                 │  continuations + new screens + eval
    learner rank 0 (PULL) ◄──ScreenReport, RolloutGroup, GroupDropped, EvalResult (PUSH)──┘
    learner rank 0 ══ weight broadcast (sync group) ══► engine.receive_weights(v)  (between calls)
```
What bounds the policy lag: the dispatcher hands out work only while it can still be trained within k
versions, and the sampler loads new weights between generation calls, never during one. Evaluation items are
always generated before loading newer weights, so eval at version v is measured on exactly version v.

Faults. A heartbeat thread (speed_async.sampler.heartbeat) keeps beating while the engine is busy. A failed
join or weight receive is reported (`SyncFailed`) and the sampler generates nothing until the learner has
re-formed the group and sent complete weights again (bounded: `LearnerUnresponsive` after a while). `Rejoin`
from the learner (it lost this sampler, e.g. after a long stall) drops all work and says hello again. Every
wait for the learner is bounded by pipeline.request_timeout_s; past it the sampler raises
`LearnerUnresponsive` naming what it waited for (the role exits with status 3).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from speed_async.config import Config
from speed_async.curriculum.groups import (
    CompletedGroup,
    DroppedGroup,
    GroupAssembler,
    Outcome,
    PromptWork,
    Response,
    ScreenOutcome,
)
from speed_async.protocol import (
    EvalAssignment,
    EvalResult,
    GroupDropped,
    Heartbeat,
    Hello,
    JoinSyncGroup,
    Message,
    NoWork,
    Rejoin,
    ScreenReport,
    Shutdown,
    SyncDone,
    SyncFailed,
    UpdateWeights,
    WorkAssignment,
    WorkRequest,
)
from speed_async.rewards import RewardPool, overlong_penalty
from speed_async.sampler.heartbeat import HeartbeatThread
from speed_async.sampler.wire import rollout_group_message, work_from_item
from speed_async.transport import Context, DealerSocket, PushSocket, TransportTimeout

log = logging.getLogger("speed_async.sampler")
HEARTBEAT_EVERY_S = 2.0
WORK_ANSWER_WAIT_S = 0.25
"""How long the sampler waits for the answer to a work request it has just sent before its next generation
call. The dispatcher answers within milliseconds, and the new prompts then ride along in this call instead of
the next one (at k = 0 a SPEED step needs one call fewer whenever its first screening call fell short)."""
MAX_SYNC_FAILURES = 5
"""Consecutive failed weight-sync joins or receives before the sampler gives up (exits with an error)."""


class LearnerUnresponsive(TimeoutError):
    """The learner did not answer or take results within pipeline.request_timeout_s (the message says what)."""


@dataclass(frozen=True)
class SamplerEndpoints:
    """Where the sampler connects (from its command line)."""

    work: str
    results: str


class SamplerLoop:
    """One sampler: engine + reward pool + group assembler + sockets."""

    def __init__(
        self,
        config: Config,
        sampler_id: int,
        endpoints: SamplerEndpoints | Callable[[], SamplerEndpoints],
        model_path: str,
        *,
        key: bytes | None = None,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoTokenizer

        from speed_async.sampler.engine import Engine, SamplingSettings

        self.config = config
        self.sampler_id = sampler_id
        self.device = device
        rollout = config.rollout
        self.engine = Engine(
            model_path,
            device=device,
            dtype=config.model.engine_dtype,
            seed=config.trainer.seed * 1000 + sampler_id,
            max_model_len=config.data.max_prompt_length + rollout.max_response_length,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enforce_eager=rollout.enforce_eager,
        )
        self.settings = SamplingSettings(
            temperature=rollout.temperature, top_p=rollout.top_p, max_tokens=rollout.max_response_length, seed=None
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.rewards = RewardPool(
            num_workers=config.pipeline.reward_workers, timeout_s=config.pipeline.reward_timeout_s
        )
        self.assembler = GroupAssembler(
            config.curriculum.mode, config.curriculum.pass_rate_low, config.curriculum.pass_rate_high
        )
        if callable(endpoints):  # resolved only now: the engine starts while the learner is still starting
            endpoints = endpoints()
        self.ctx = Context()
        max_bytes = config.pipeline.max_message_bytes
        identity = f"sampler-{sampler_id}-{os.getpid()}".encode()  # one per process: the learner tells them apart
        self.dealer = DealerSocket(self.ctx, endpoints.work, identity, key=key, max_bytes=max_bytes)
        self.push = PushSocket(self.ctx, endpoints.results, key=key, max_bytes=max_bytes)
        self.endpoints = endpoints
        self.activity = ("starting", time.monotonic())  # what the main loop does, since when (for heartbeats)
        self.heartbeat = HeartbeatThread(
            self.ctx,
            endpoints.results,
            sampler_id,
            config.pipeline.heartbeat_s,
            self._status,
            key=key,
            max_bytes=max_bytes,
        )
        self.sync_generation: int | None = None  # the weight-sync generation this engine is in
        self.weights_ok = True  # False after a failed receive: possibly half-loaded weights, generate nothing
        self.weights_bad_since = 0.0
        self.sync_failures = 0
        self._sync_store = None  # TCPStore client of the learner's sync store (membership barriers)
        self.eval_items: list[PromptWork] = []
        self.eval_version = -1
        self.pending_update: UpdateWeights | None = None
        self.request_sent_at: float | None = None
        self.retry_at = 0.0
        self.last_heartbeat = 0.0
        self.stopping: str | None = None
        # Where the sampler's wall time goes (written to sampler-<id>.json at the end of a run).
        self.stats = {
            "generated_tokens": 0,
            "calls": 0,
            "generation_s": 0.0,
            "scoring_s": 0.0,
            "eval_s": 0.0,  # of generation_s + scoring_s, the held-out evaluations'
            "weight_sync_s": 0.0,
            "idle_s": 0.0,
            "wall_s": 0.0,
        }
        self.t_first_work: float | None = None  # the stats' window starts with the first work

    # ---- messages ----------------------------------------------------------------------------------------
    def _status(self) -> tuple[int, int, str]:
        """(version, pending items, state) for the heartbeat thread."""
        what, since = self.activity
        pending = self.assembler.num_new + self.assembler.num_continue + len(self.eval_items)
        return self.engine.version, pending, f"{what} for {time.monotonic() - since:.1f} s"

    def _doing(self, what: str) -> None:
        self.activity = (what, time.monotonic())

    def _send_control(self, msg: Message) -> None:
        self._send(self.dealer, msg, self.endpoints.work)

    def _emit(self, msg: Message) -> None:
        self._send(self.push, msg, self.endpoints.results)

    def _send(self, sock: DealerSocket | PushSocket, msg: Message, endpoint: str) -> None:
        timeout = self.config.pipeline.request_timeout_s
        try:
            sock.send(msg, timeout_s=timeout)
        except TransportTimeout:
            raise LearnerUnresponsive(
                f"sampler {self.sampler_id}: the learner is unresponsive: sending {msg.TAG} to {endpoint} was "
                f"blocked for {timeout:g} s (pipeline.request_timeout_s): the learner takes no messages"
            ) from None

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, WorkAssignment):
            if self.t_first_work is None:
                self.t_first_work = time.perf_counter()
            self.request_sent_at = None
            self.assembler.add(work_from_item(item) for item in msg.items)
        elif isinstance(msg, NoWork):
            self.request_sent_at = None
            self.retry_at = time.monotonic() + msg.retry_after_s
        elif isinstance(msg, EvalAssignment):
            self.eval_items.extend(work_from_item(item) for item in msg.items)
            self.eval_version = msg.version
        elif isinstance(msg, JoinSyncGroup):
            self._join(msg)
        elif isinstance(msg, UpdateWeights):
            if msg.generation == self.sync_generation:
                self.pending_update = msg
            else:  # announced on a generation this engine is not (or no longer) in
                log.info(
                    "sampler %d: update v%d on generation %d ignored", self.sampler_id, msg.version, msg.generation
                )
        elif isinstance(msg, Rejoin):
            self._rejoin(msg.reason)
        elif isinstance(msg, Shutdown):
            self.stopping = msg.reason
        else:
            log.warning("sampler %d: unexpected %s on the work channel", self.sampler_id, type(msg).__name__)

    def _join(self, msg: JoinSyncGroup) -> None:
        """Join weight-sync generation `msg.generation`: the membership barrier, then the process group."""
        from speed_async.weight_sync.group import connect_store
        from speed_async.weight_sync.rendezvous import RendezvousError, join_generation

        self._doing(f"joining weight-sync generation {msg.generation}")
        self.pending_update = None
        self.sync_generation = None
        try:
            if self._sync_store is None or self._sync_store[0] != (msg.master_addr, msg.master_port):
                store = connect_store(msg.master_addr, msg.master_port, is_master=False, timeout_s=msg.timeout_s)
                self._sync_store = ((msg.master_addr, msg.master_port), store)
            join_generation(self._sync_store[1], msg.generation, msg.rank, msg.world_size, 2 * msg.timeout_s)
            backend = "nccl" if self.device == "cuda" else "gloo"
            self.engine.init_weight_sync(
                msg.master_addr,
                msg.master_port,
                msg.rank,
                msg.world_size,
                backend,
                msg.timeout_s,
                generation=msg.generation,
            )
        except RendezvousError as err:  # reported, so that a sampler left out meanwhile is taken in again
            self._sync_failed(msg.generation, err, count=err.reason == "timeout")
            return
        except Exception as err:  # a failed join is reported; the learner forms a new group
            self._sync_failed(msg.generation, err)
            return
        self.sync_generation = msg.generation

    def _sync_failed(self, generation: int, err: BaseException | str, count: bool = True) -> None:
        """Report a failed join or receive; give up after MAX_SYNC_FAILURES counted ones in a row."""
        self.sync_failures += int(count)
        log.warning("sampler %d: weight sync on generation %d failed: %s", self.sampler_id, generation, err)
        if self.sync_failures >= MAX_SYNC_FAILURES:
            raise RuntimeError(f"sampler {self.sampler_id}: {self.sync_failures} failed weight syncs in a row")
        self.sync_generation = None
        self._send_control(
            SyncFailed(
                sampler_id=self.sampler_id, generation=generation, version=self.engine.version, error=str(err)[:500]
            )
        )

    def _receive(self, update: UpdateWeights) -> None:
        """Receive and load weights `update.version`; on failure the weights count as incomplete."""
        self._doing(f"receiving weights version {update.version}")
        from speed_async.weight_sync.rendezvous import is_abandoned

        if self._sync_store is not None and (reason := is_abandoned(self._sync_store[1], update.generation)):
            # The learner gave this transfer up while this engine was busy: nothing will come; say so.
            self.sync_generation = None
            self._sync_failed(update.generation, f"generation abandoned before the transfer ({reason})", count=False)
            return
        try:
            seconds = self.engine.receive_weights(update.version)
        except Exception as err:  # the reload may be partial: generate nothing until a full one
            if self.weights_ok:
                self.weights_ok, self.weights_bad_since = False, time.monotonic()
            self._sync_failed(update.generation, err)
            return
        self.weights_ok, self.sync_failures = True, 0
        self.stats["weight_sync_s"] += seconds
        self._send_control(SyncDone(sampler_id=self.sampler_id, version=update.version, seconds=seconds))

    def _check_weights_wait(self) -> None:
        """Incomplete weights are re-sent once the learner has re-formed the group; bound that wait."""
        pipeline = self.config.pipeline
        limit = 2 * (2 * pipeline.sync_timeout_s + pipeline.sampler_timeout_s)
        if not self.weights_ok and time.monotonic() - self.weights_bad_since > limit:
            raise LearnerUnresponsive(
                f"sampler {self.sampler_id}: the learner is unresponsive: it did not re-send the weights within "
                f"{limit:g} s after a failed receive (2 x (2 x pipeline.sync_timeout_s + pipeline.sampler_timeout_s))"
            )

    def _rejoin(self, reason: str) -> None:
        """The learner lost this sampler: drop all work (it was re-issued), leave the group, say hello again."""
        log.warning("sampler %d: the learner asks it to rejoin (%s); dropping its work", self.sampler_id, reason)
        self.assembler = GroupAssembler(
            self.config.curriculum.mode, self.config.curriculum.pass_rate_low, self.config.curriculum.pass_rate_high
        )
        self.eval_items, self.pending_update, self.request_sent_at, self.retry_at = [], None, None, 0.0
        self.sync_generation = None
        self._send_control(Hello(sampler_id=self.sampler_id, pid=os.getpid(), hostname=socket.gethostname()))

    def _drain(self, timeout_s: float) -> None:
        """Handle every message already waiting; wait up to `timeout_s` for the first one."""
        msg = self.dealer.recv(timeout_s)
        while msg is not None:
            self._handle(msg)
            msg = self.dealer.recv(0.0)

    def _maybe_request_work(self) -> None:
        now = time.monotonic()
        if self.request_sent_at is not None:
            waited = now - self.request_sent_at
            if waited > self.config.pipeline.request_timeout_s:
                raise LearnerUnresponsive(
                    f"sampler {self.sampler_id}: the learner is unresponsive: the dispatcher at "
                    f"{self.endpoints.work} did not answer a work request within {waited:.0f} s "
                    f"(pipeline.request_timeout_s = {self.config.pipeline.request_timeout_s:g})"
                )
            return
        want = self.config.rollout.gen_batch_size - self.assembler.num_new
        if want > 0 and now >= self.retry_at and self.weights_ok:
            self._send_control(WorkRequest(sampler_id=self.sampler_id, version=self.engine.version, max_prompts=want))
            self.request_sent_at = now

    def _await_work_answer(self) -> None:
        """Handle messages until the outstanding work request is answered, at most WORK_ANSWER_WAIT_S after
        it was sent (an older request is not waited for)."""
        if self.request_sent_at is None:
            return
        start = time.perf_counter()
        deadline = self.request_sent_at + WORK_ANSWER_WAIT_S
        while self.request_sent_at is not None and self.stopping is None and (left := deadline - time.monotonic()) > 0:
            self._drain(left)
        if self.t_first_work is not None:
            self.stats["idle_s"] += time.perf_counter() - start

    def _heartbeat(self) -> None:
        """Also beat on the work channel now and then: the learner answers a sampler it lost with Rejoin."""
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_EVERY_S:
            version, pending, state = self._status()
            self._send_control(
                Heartbeat(sampler_id=self.sampler_id, version=version, num_pending=pending, state=state[:200])
            )
            self.last_heartbeat = now

    # ---- generation --------------------------------------------------------------------------------------
    def _generate(self, batch: Sequence[tuple[PromptWork, int]]) -> list[list[Response]]:
        version = self.engine.version
        start = time.perf_counter()
        self._doing(f"generating {sum(n for _, n in batch)} samples at version {version}")
        completions = self.engine.generate([w.prompt_token_ids for w, _ in batch], [n for _, n in batch], self.settings)
        self._doing("scoring")
        self.stats["generation_s"] += time.perf_counter() - start
        self.stats["calls"] += 1
        items, owners = [], []
        for i, ((work, _), comps) in enumerate(zip(batch, completions, strict=True)):
            for comp in comps:
                text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=True)
                items.append((text, work.ground_truth))
                owners.append(i)
        start = time.perf_counter()
        scores = self.rewards.score_batch(items)
        self.stats["scoring_s"] += time.perf_counter() - start
        out: list[list[Response]] = [[] for _ in batch]
        buffer, max_len = self.config.algorithm.overlong_buffer, self.config.rollout.max_response_length
        flat = [c for comps in completions for c in comps]
        for owner, comp, score in zip(owners, flat, scores, strict=True):
            length = len(comp.token_ids)
            self.stats["generated_tokens"] += length
            reward = score + (overlong_penalty(length, max_len, buffer) if buffer > 0 else 0.0)
            out[owner].append(
                Response(
                    token_ids=np.asarray(comp.token_ids, dtype=np.int32),
                    logprobs=np.asarray(comp.logprobs, dtype=np.float32),
                    finish_reason=comp.finish_reason,
                    score=float(score),
                    reward=float(reward),
                    version_min=version,
                    version_max=version,
                )
            )
        return out

    def _emit_outcome(self, outcome: Outcome | None) -> None:
        if isinstance(outcome, ScreenOutcome):
            w = outcome.work
            self._emit(
                ScreenReport(
                    sampler_id=self.sampler_id,
                    prompt_id=w.prompt_id,
                    epoch=w.epoch,
                    version=outcome.version,
                    rewards=outcome.scores,
                    qualified=outcome.qualified,
                )
            )
        elif isinstance(outcome, CompletedGroup):
            self._emit(rollout_group_message(self.sampler_id, outcome))
        elif isinstance(outcome, DroppedGroup):
            w = outcome.work
            self._emit(
                GroupDropped(
                    sampler_id=self.sampler_id,
                    prompt_id=w.prompt_id,
                    epoch=w.epoch,
                    version=outcome.version,
                    reason=outcome.reason,
                    rewards=outcome.scores,
                )
            )

    def step(self) -> bool:
        """One turn of the loop; returns False once told to stop."""
        self._drain(0.0)
        if self.stopping is not None:
            return False
        update = self.pending_update
        if update is not None and not (self.eval_items and self.eval_version < update.version and self.weights_ok):
            self.pending_update = None
            self._receive(update)
        self._maybe_request_work()
        self._await_work_answer()
        self._heartbeat()
        self._check_weights_wait()
        if not self.weights_ok:
            self._doing("waiting for complete weights")
            self._drain(0.05)
            return self.stopping is None
        train_batch = self.assembler.next_batch(self.config.rollout.gen_batch_size)
        eval_batch = [(w, w.num_screen) for w in self.eval_items]
        self.eval_items = []
        if not train_batch and not eval_batch:
            start = time.perf_counter()
            self._doing("idle")
            self._drain(0.05)
            if self.t_first_work is not None:
                self.stats["idle_s"] += time.perf_counter() - start
            return self.stopping is None
        if eval_batch:  # a call of its own, so the time evaluation takes from training is measured
            self._evaluate(eval_batch)
        if train_batch:
            responses = self._generate(train_batch)
            for (work, _), resp in zip(train_batch, responses, strict=True):
                self._emit_outcome(self.assembler.complete(work, resp))
        return True

    def _evaluate(self, batch: Sequence[tuple[PromptWork, int]]) -> None:
        start = time.perf_counter()
        responses = self._generate(batch)
        elapsed = time.perf_counter() - start
        self.stats["eval_s"] += elapsed
        share = elapsed / len(batch)
        for (work, _), resp in zip(batch, responses, strict=True):
            self._emit(
                EvalResult(
                    sampler_id=self.sampler_id,
                    prompt_id=work.prompt_id,
                    data_source=work.data_source,
                    version=resp[0].version_min,
                    scores=np.array([r.score for r in resp], dtype=np.float32),
                    response_lengths=np.array([len(r.token_ids) for r in resp], dtype=np.int32),
                    seconds=share,
                )
            )

    def run(self) -> str:
        """Say hello, then loop until the dispatcher says stop; returns the reason."""
        self._send_control(Hello(sampler_id=self.sampler_id, pid=os.getpid(), hostname=socket.gethostname()))
        self.heartbeat.start()
        while self.step():
            pass
        if self.t_first_work is not None:
            self.stats["wall_s"] = time.perf_counter() - self.t_first_work
        return self.stopping or "stopped"

    def close(self) -> None:
        """Release the engine, the reward workers and the sockets."""
        self.heartbeat.stop()
        self.rewards.close()
        self.dealer.close()
        self.push.close()
        self.ctx.close()
        self.engine.close()
