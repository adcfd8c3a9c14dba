"""The sampler process: keeps one vLLM engine full, request by request, and streams each group when complete.

```
  dispatcher (ROUTER) ──WorkAssignment / NoWork / UpdateWeights / EvalAssignment / Shutdown──►┐
      ▲                                                                                       │
      └──Hello, WorkRequest, Heartbeat, SyncDone (DEALER)──── sampler loop ◄──────────────────┘
                                                                │ each turn: messages, weights, work request,
          engine (in process): submit ──► step ──► finished ────┤ submit (continuations, evaluation, screens
          reward host (process): submit ──► poll ──► scored   ──┤ up to rollout.max_num_seqs), one engine
                                                                │ step, hand finished samples to the reward
  learner rank 0 (PULL) ◄──ScreenReport, RolloutGroup, GroupDropped, EvalResult (PUSH)──┘ host, emit what
  learner rank 0 ══ weight broadcast (sync group) ══► engine.receive_weights(v)  between two steps   completed
```
Every screen, continuation and evaluation item is a request submitted as soon as it is known: a continuation
as soon as the dispatcher answers its screen's report with `ContinueDecision(go=True)` (a few milliseconds; it
declines a screen whose group no open batch slot awaits, and hands the prompt out again later), new screens
whenever the engine has room. Scores come back from the reward host and its worker processes while the
engine runs the next steps, so scoring never stops the engine (`speed_async.sampler.scoring`). A group is emitted
the moment its last response is scored. Screens fill the engine to rollout.max_num_seqs plus about one step's
finished requests waiting in its queue (`finished_per_step`), so the slots a step frees refill in the next.

What bounds the policy lag. The dispatcher hands out work only while it can still be trained within k
versions. Weights change only between two engine steps, per `rollout.weight_update_mode`: `keep` (requests in
flight continue under the new weights), `wait` (no new requests until those in flight finish), `abort` (they
are dropped and their prompts returned). Each response carries the engine's version when it was submitted
(`version_min`) and when it finished (`version_max`); a group's version is the minimum. Work that can no longer
be trained within the bound (its first request is more than k versions older than the new weights) is dropped
and returned in every mode. Evaluation items finish before newer weights load, so eval at v is exactly v.

Faults. A heartbeat thread keeps beating, with the loop's time accounting (`ActivityClock`). `Rejoin` drops
all work and says hello again; failed weight syncs are handled by `speed_async.sampler.sync`. Every wait for
the learner is bounded by pipeline.request_timeout_s (`LearnerUnresponsive`, exit status 3).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from speed_async.config import Config
from speed_async.curriculum.groups import PromptWork
from speed_async.protocol import Hello, ScreenReport, UpdateWeights, WorkRequest
from speed_async.sampler.activity import ActivityClock
from speed_async.sampler.channel import BOUND_REASONS as BOUND_REASONS  # re-exported: it was defined here
from speed_async.sampler.channel import HEARTBEAT_EVERY_S as HEARTBEAT_EVERY_S  # re-exported, likewise
from speed_async.sampler.channel import ChannelMixin
from speed_async.sampler.heartbeat import HeartbeatThread
from speed_async.sampler.inflight import RequestBook
from speed_async.sampler.scoring import Scorer
from speed_async.sampler.sync import LearnerUnresponsive, WeightSync
from speed_async.sampler.updates import UpdatesMixin
from speed_async.sampler.wire import dropped_message, eval_result_message, outcome_message, reward_stats_messages
from speed_async.transport import Context, DealerSocket, PushSocket

__all__ = ["LearnerUnresponsive", "SamplerEndpoints", "SamplerLoop"]

log = logging.getLogger("speed_async.sampler")
REWARD_STATS_EVERY_S = 1.0
"""How often the sampler sends the learner what its reward workers counted per data source (RewardStats)."""
IDLE_WAIT_S = 0.02
"""With nothing to run, how long one turn waits for a message or a score."""
QUEUE_EMA_WEIGHT = 0.2
"""Weight of the latest engine step in `finished_per_step`, the moving average that sizes the engine's queue."""


@dataclass(frozen=True)
class SamplerEndpoints:
    """Where the sampler connects (from its command line)."""

    work: str
    results: str


class SamplerLoop(ChannelMixin, UpdatesMixin):
    """One sampler: engine + reward host + group assembler + request book + sockets.

    Its messages are `ChannelMixin`'s (`speed_async.sampler.channel`), its weight updates `UpdatesMixin`'s
    (`speed_async.sampler.updates`); this class holds the state and runs the turns: work requests, submitting,
    engine steps, scores."""

    def __init__(
        self,
        config: Config,
        sampler_id: int,
        endpoints: SamplerEndpoints | Callable[[], SamplerEndpoints],
        model_path: str,
        *,
        key: bytes | None = None,
        device: str = "cpu",
        reward_cpus: set[int] | None = None,
    ) -> None:
        from speed_async.sampler.engine import Engine, SamplingSettings

        self.config = config
        self.sampler_id = sampler_id
        rollout = config.rollout
        # The reward host (a process) and ZeroMQ's I/O thread wake hundreds of times a second: on the reward
        # workers' cores other than the engine's where there are any (a thread waking that often on the engine's
        # core costs it 5-8%: benchmarks/results/sampler-throughput_cpu-2core_2026-12-05.md). The host starts
        # first, so that its workers import their reward functions while the engine starts.
        side_cpus = set(reward_cpus) - os.sched_getaffinity(0) if reward_cpus else set()
        self.scorer = Scorer(config, model_path, cpus=reward_cpus, host_cpus=side_cpus)
        try:
            self.engine = Engine(
                model_path,
                device=device,
                dtype=config.model.engine_dtype,
                seed=config.trainer.seed * 1000 + sampler_id,
                max_model_len=config.data.max_prompt_length + rollout.max_response_length,
                gpu_memory_utilization=rollout.gpu_memory_utilization,
                enforce_eager=rollout.enforce_eager,
                max_num_seqs=rollout.max_num_seqs,
                helper_cpus=side_cpus,
            )
        except BaseException:
            self.scorer.close()
            raise
        log.info("engine dtype %s (model.engine_dtype = %s)", self.engine.dtype, config.model.engine_dtype)
        self.settings = SamplingSettings(
            temperature=rollout.temperature, top_p=rollout.top_p, max_tokens=rollout.max_response_length, seed=None
        )
        self.assembler = self._new_assembler()
        self.book = RequestBook()
        self.clock = ActivityClock("idle_work")
        if callable(endpoints):  # resolved only now: the engine starts while the learner is still starting
            endpoints = endpoints()
        self.endpoints = endpoints
        self.ctx = Context(io_cpus=side_cpus)
        max_bytes = config.pipeline.max_message_bytes
        identity = f"sampler-{sampler_id}-{os.getpid()}".encode()  # one per process: the learner tells them apart
        self.dealer = DealerSocket(self.ctx, endpoints.work, identity, key=key, max_bytes=max_bytes)
        self.push = PushSocket(self.ctx, endpoints.results, key=key, max_bytes=max_bytes)
        self.heartbeat = HeartbeatThread(
            self.ctx,
            endpoints.results,
            sampler_id,
            config.pipeline.heartbeat_s,
            self._status,
            key=key,
            max_bytes=max_bytes,
            times=self.clock.snapshot,
        )
        self.sync = WeightSync(config, sampler_id, self.engine, device, self._send_control)
        self.pending_update: UpdateWeights | None = None
        self.eval_items: list[tuple[PromptWork, int]] = []  # (item, version to evaluate)
        self.decision_due: dict[tuple[int, int], float] = {}  # qualified screens: when their decision is due
        self.request_sent_at: float | None = None
        self.retry_at = 0.0
        self.bound_wait = False  # the last NoWork said: newer weights first
        self.last_heartbeat = 0.0
        self.last_reward_stats = 0.0
        self.stopping: str | None = None
        self.counters = dict.fromkeys(
            ("generated_tokens", "requests", "aborted_requests", "returned_prompts", "engine_steps", "sequence_steps"),
            0,
        )
        """engine_steps: engine steps run; sequence_steps: the requests in flight summed over them (their ratio is
        the mean occupancy of the engine's batch)."""
        self.t_first_work: float | None = None
        self.finished_per_step = 0.0
        """Requests finished per engine step, a moving average: how many requests the engine's queue holds beyond
        its max_num_seqs, so that the slots a step frees are filled by the next step, not the one after it (the
        sampler submits whole prompts, between steps). Sequences per engine step (steps at >= 200), pipeline vs bare
        engine in benchmarks/sampler_throughput.py: 252.7 vs 255.5 before, 255.9 vs 255.9 with it."""

    # ---- work --------------------------------------------------------------------------------------------
    def _capacity(self) -> int:
        return self.engine.max_num_seqs

    def _maybe_request_work(self) -> None:
        now = time.monotonic()
        timeout = self.config.pipeline.request_timeout_s
        if self.request_sent_at is not None:
            if now - self.request_sent_at > timeout:
                raise LearnerUnresponsive(
                    f"sampler {self.sampler_id}: the learner is unresponsive: the dispatcher at "
                    f"{self.endpoints.work} did not answer a work request within {now - self.request_sent_at:.0f} "
                    f"s (pipeline.request_timeout_s = {timeout:g})"
                )
            return
        if now < self.retry_at or not self.sync.weights_ok or self._draining():
            return
        want = min(
            self.config.rollout.gen_batch_size - self.book.screening - self.assembler.num_new,
            math.ceil(2 * self._capacity() / self.config.rollout.n) - self.assembler.num_new,
        )
        if want > 0:
            msg = WorkRequest(sampler_id=self.sampler_id, version=self.engine.version, max_prompts=want)
            self._send_control(msg)
            self.request_sent_at = now

    def _submit(self) -> None:
        """Fill the engine: evaluation items, every waiting continuation, then new screens while there is room."""
        version = self.engine.version
        for work, eval_version in self.eval_items:
            self._open(work, work.num_screen, version, eval_version)
        self.eval_items = []
        if self._draining():
            return
        rollout = self.config.rollout
        waiting = self.assembler.num_continue + self.assembler.num_pending  # pending ones are mostly continued
        queue = math.ceil(self.finished_per_step)  # refills at once the slots that free up in the next step
        room = self._capacity() + queue - self.engine.num_unfinished - waiting * rollout.n_continue
        batch = self.assembler.next_batch(max(0, room // rollout.n))
        for work, count in batch:
            self._open(work, count, version, None)

    def _open(self, work: PromptWork, count: int, version: int, eval_version: int | None) -> None:
        ids = self.book.open(work, count, version, eval_version)
        self.engine.submit_many(ids, work.prompt_token_ids, self.settings)
        self.counters["requests"] += len(ids)

    def _run_engine(self) -> None:
        """One engine step; its finished samples go to the reward host."""
        train, evals = self.book.in_flight()
        self.counters["engine_steps"] += 1
        self.counters["sequence_steps"] += train + evals
        self.clock.switch("generating")
        finished = self.engine.step()
        self.book.charge(self.clock.split({"generating": train, "evaluating": evals}))
        done = []
        for rid, completion in finished:
            found = self.book.finish(rid)
            if found is not None:
                stage, index, version = found
                done.append((stage, index, completion, version, self.engine.version))
                self.counters["generated_tokens"] += len(completion.token_ids)
        self.finished_per_step += QUEUE_EMA_WEIGHT * (len(finished) - self.finished_per_step)
        self.scorer.submit(done)

    def _collect_scores(self, timeout_s: float) -> None:
        """Attach the scores that came back; emit every stage they complete."""
        for stage, index, response in self.scorer.collect(timeout_s):
            if not self.book.add_response(stage, index, response):
                continue
            responses = stage.ordered_responses()
            if stage.is_eval:
                msg = eval_result_message(
                    self.sampler_id, stage.work, int(stage.eval_version), responses, stage.engine_s
                )
            else:
                msg = outcome_message(self.sampler_id, self.assembler.complete(stage.work, responses))
                if isinstance(msg, ScreenReport) and msg.qualified:
                    self.decision_due[stage.work.key] = time.monotonic() + self.config.pipeline.request_timeout_s
            if msg is not None:
                self._emit(msg)
        now = time.monotonic()
        if now - self.last_reward_stats >= REWARD_STATS_EVERY_S:
            self.last_reward_stats = now
            for msg in reward_stats_messages(self.sampler_id, self.scorer.take_stats()):
                self._emit(msg)

    def _expire_decisions(self) -> None:
        """Drop qualified screens whose decision did not come within pipeline.request_timeout_s (the prompt goes
        back to the dispatcher, which re-issues it if it still holds it in flight)."""
        now = time.monotonic()
        for key, due in list(self.decision_due.items()):
            if now < due:
                continue
            del self.decision_due[key]
            work = self.assembler.decide(key, False)
            if work is None:
                continue
            log.warning(
                "sampler %d: the dispatcher at %s did not decide within %g s (pipeline.request_timeout_s) whether to "
                "continue prompt %d (epoch %d); its screen is dropped and the prompt returned",
                self.sampler_id, self.endpoints.work, self.config.pipeline.request_timeout_s, key[1], key[0],
            )  # fmt: skip
            version = min(r.version_min for r in work.responses)
            self._emit(dropped_message(self.sampler_id, work, "no_decision", version))

    # ---- the loop ----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One turn of the loop; returns False once told to stop."""
        self._drain(0.0)
        if self.stopping is not None:
            return False
        self._maybe_update()
        self._expire_decisions()
        self._maybe_request_work()
        self._heartbeat()
        self.sync.check_wait()
        if not self.sync.weights_ok:
            self.clock.switch("idle_weights")
            self._drain(0.05)
            return self.stopping is None
        self._submit()
        if self.engine.num_unfinished:
            self._run_engine()
            self._collect_scores(0.0)
        elif self.scorer.pending:
            self.clock.switch("scoring")
            self._collect_scores(IDLE_WAIT_S)
        else:
            self.clock.switch("idle_weights" if self.bound_wait or self.pending_update else "idle_work")
            self._drain(IDLE_WAIT_S)
        return self.stopping is None

    def run(self) -> str:
        """Say hello, then loop until the dispatcher says stop; returns the reason."""
        self._send_control(Hello(sampler_id=self.sampler_id, pid=os.getpid(), hostname=socket.gethostname()))
        self.heartbeat.start()
        while self.step():
            pass
        return self.stopping or "stopped"

    @property
    def stats(self) -> dict[str, float]:
        """Where the sampler's time went (seconds per activity, since its start) and its counters."""
        return {**{f"{k}_s": v for k, v in self.clock.totals().items()}, **self.counters}

    def close(self) -> None:
        """Release the engine, the reward workers and the sockets."""
        self.heartbeat.stop()
        self.scorer.close()
        self.dealer.close()
        self.push.close()
        self.ctx.close()
        self.engine.close()
