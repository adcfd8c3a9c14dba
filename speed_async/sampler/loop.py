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
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
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
    RolloutGroup,
    ScreenReport,
    Shutdown,
    SyncDone,
    UpdateWeights,
    WorkAssignment,
    WorkRequest,
)
from speed_async.rewards import RewardPool, overlong_penalty
from speed_async.transport import Context, DealerSocket, PushSocket

log = logging.getLogger("speed_async.sampler")
HEARTBEAT_EVERY_S = 2.0


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
        endpoints: SamplerEndpoints,
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
        self.ctx = Context()
        max_bytes = config.pipeline.max_message_bytes
        identity = f"sampler-{sampler_id}".encode()
        self.dealer = DealerSocket(self.ctx, endpoints.work, identity, key=key, max_bytes=max_bytes)
        self.push = PushSocket(self.ctx, endpoints.results, key=key, max_bytes=max_bytes)
        self.endpoints = endpoints
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
            "weight_sync_s": 0.0,
            "idle_s": 0.0,
            "wall_s": 0.0,
        }
        self.t_first_work: float | None = None  # the stats' window starts with the first work

    # ---- messages ----------------------------------------------------------------------------------------
    def _send_control(self, msg: Message) -> None:
        self.dealer.send(msg, timeout_s=self.config.pipeline.request_timeout_s)

    def _emit(self, msg: Message) -> None:
        self.push.send(msg, timeout_s=self.config.pipeline.request_timeout_s)

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, WorkAssignment):
            if self.t_first_work is None:
                self.t_first_work = time.perf_counter()
            self.request_sent_at = None
            self.assembler.add(_work_from_item(item) for item in msg.items)
        elif isinstance(msg, NoWork):
            self.request_sent_at = None
            self.retry_at = time.monotonic() + msg.retry_after_s
        elif isinstance(msg, EvalAssignment):
            self.eval_items.extend(_work_from_item(item) for item in msg.items)
            self.eval_version = msg.version
        elif isinstance(msg, JoinSyncGroup):
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
        elif isinstance(msg, UpdateWeights):
            self.pending_update = msg
        elif isinstance(msg, Shutdown):
            self.stopping = msg.reason
        else:
            log.warning("sampler %d: unexpected %s on the work channel", self.sampler_id, type(msg).__name__)

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
                raise TimeoutError(
                    f"sampler {self.sampler_id}: the dispatcher at {self.endpoints.work} did not answer a "
                    f"WorkRequest within {waited:.0f} s (pipeline.request_timeout_s)"
                )
            return
        want = self.config.rollout.gen_batch_size - self.assembler.num_new
        if want > 0 and now >= self.retry_at:
            self._send_control(WorkRequest(sampler_id=self.sampler_id, version=self.engine.version, max_prompts=want))
            self.request_sent_at = now

    def _heartbeat(self, state: str) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_EVERY_S:
            pending = self.assembler.num_new + self.assembler.num_continue + len(self.eval_items)
            self._send_control(
                Heartbeat(sampler_id=self.sampler_id, version=self.engine.version, num_pending=pending, state=state)
            )
            self.last_heartbeat = now

    # ---- generation --------------------------------------------------------------------------------------
    def _generate(self, batch: Sequence[tuple[PromptWork, int]]) -> list[list[Response]]:
        version = self.engine.version
        start = time.perf_counter()
        completions = self.engine.generate([w.prompt_token_ids for w, _ in batch], [n for _, n in batch], self.settings)
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
        if update is not None and not (self.eval_items and self.eval_version < update.version):
            seconds = self.engine.receive_weights(update.version)
            self.stats["weight_sync_s"] += seconds
            self.pending_update = None
            self._send_control(SyncDone(sampler_id=self.sampler_id, version=update.version, seconds=seconds))
        self._maybe_request_work()
        self._heartbeat("running")
        train_batch = self.assembler.next_batch(self.config.rollout.gen_batch_size)
        eval_batch = [(w, w.num_screen) for w in self.eval_items]
        self.eval_items = []
        if not train_batch and not eval_batch:
            start = time.perf_counter()
            self._drain(0.05)
            if self.t_first_work is not None:
                self.stats["idle_s"] += time.perf_counter() - start
            return self.stopping is None
        responses = self._generate([*train_batch, *eval_batch])
        for (work, _), resp in zip(train_batch, responses[: len(train_batch)], strict=True):
            self._emit_outcome(self.assembler.complete(work, resp))
        for (work, _), resp in zip(eval_batch, responses[len(train_batch) :], strict=True):
            self._emit(
                EvalResult(
                    sampler_id=self.sampler_id,
                    prompt_id=work.prompt_id,
                    data_source=work.data_source,
                    version=resp[0].version_min,
                    scores=np.array([r.score for r in resp], dtype=np.float32),
                    response_lengths=np.array([len(r.token_ids) for r in resp], dtype=np.int32),
                )
            )
        return True

    def run(self) -> str:
        """Say hello, then loop until the dispatcher says stop; returns the reason."""
        self._send_control(Hello(sampler_id=self.sampler_id, pid=os.getpid(), hostname=socket.gethostname()))
        while self.step():
            pass
        if self.t_first_work is not None:
            self.stats["wall_s"] = time.perf_counter() - self.t_first_work
        return self.stopping or "stopped"

    def close(self) -> None:
        """Release the engine, the reward workers and the sockets."""
        self.rewards.close()
        self.dealer.close()
        self.push.close()
        self.ctx.close()
        self.engine.close()


def _work_from_item(item: object) -> PromptWork:
    return PromptWork(
        prompt_id=item.prompt_id,
        epoch=item.epoch,
        data_source=item.data_source,
        prompt_token_ids=np.asarray(item.prompt_token_ids, dtype=np.int32),
        ground_truth=item.ground_truth,
        num_screen=item.num_screen,
        num_continue=item.num_continue,
    )


def rollout_group_message(sampler_id: int, group: CompletedGroup) -> RolloutGroup:
    """Pack a complete group into its wire message (responses concatenated, screening responses first)."""
    rs = group.responses
    return RolloutGroup(
        sampler_id=sampler_id,
        prompt_id=group.work.prompt_id,
        epoch=group.work.epoch,
        data_source=group.work.data_source,
        prompt_token_ids=group.work.prompt_token_ids,
        response_token_ids=np.concatenate([r.token_ids for r in rs]).astype(np.int32),
        response_lengths=np.array([len(r.token_ids) for r in rs], dtype=np.int32),
        response_logprobs=np.concatenate([r.logprobs for r in rs]).astype(np.float32),
        rewards=np.array([r.reward for r in rs], dtype=np.float32),
        scores=np.array([r.score for r in rs], dtype=np.float32),
        finish_reasons=[r.finish_reason for r in rs],
        version_min=np.array([r.version_min for r in rs], dtype=np.int32),
        version_max=np.array([r.version_max for r in rs], dtype=np.int32),
        num_screen=group.num_screen,
    )
