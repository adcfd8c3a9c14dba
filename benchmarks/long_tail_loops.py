"""The two sampler shapes `benchmarks/long_tail.py` compares, traced alike (benchmark code: not in the package).

- `TracedLoop`: the continuous sampler, `speed_async.sampler.loop.SamplerLoop` unchanged, plus the trace.
- `BatchedLoop`: the old shape, kept here only: one blocking `Engine.generate` call per round, holding every
  continuation waiting plus up to `rollout.gen_batch_size` new screens (the paper's pre-fetching); the round's
  samples are scored once the call has returned, its outcomes sent, and new weights load between rounds. A
  prompt that qualifies is continued in the next round; a new prompt waits for the next round.

A sampler process runs one of them when `SPEED_ASYNC_SAMPLER_LOOP` names it (`launcher.roles`), e.g.
``SPEED_ASYNC_SAMPLER_LOOP=benchmarks.long_tail_loops:BatchedLoop``. The trace goes, when the loop closes, to
``$SPEED_ASYNC_TRACE_DIR/trace-<sampler id>-<pid>.json``: every vLLM engine step (monotonic start, seconds, the
sequences in its batch: running + waiting, at most max_num_seqs, the tokens finished in it, and the process's CPU
seconds at its start and end), and per prompt the monotonic time its screen was submitted and its group was sent
(time.monotonic is one clock for every process of the machine).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from speed_async.curriculum.groups import PromptWork
from speed_async.protocol import Message, RolloutGroup, ScreenReport
from speed_async.sampler.loop import IDLE_WAIT_S, SamplerLoop

TRACE_DIR_ENV = "SPEED_ASYNC_TRACE_DIR"
WORK_ANSWER_WAIT_S = 0.25
"""How long a round waits for the answer to its work request (as the old sampler did)."""


class _Trace:
    """Engine steps and per-prompt times of one sampler process."""

    def __init__(self, llm_engine: Any, max_num_seqs: int) -> None:
        # (monotonic start, seconds, sequences, tokens finished, process CPU seconds at the start and the end)
        self.steps: list[tuple[float, float, int, int, float, float]] = []
        self.screen_at: dict[str, float] = {}
        self.screened_at: dict[str, float] = {}
        self.group_at: dict[str, float] = {}
        scheduler = llm_engine.engine_core.engine_core.scheduler  # in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        step = llm_engine.step

        def traced_step() -> list[Any]:
            seqs = min(len(scheduler.running) + len(scheduler.waiting), max_num_seqs)
            start, cpu = time.monotonic(), time.process_time()
            outputs = step()
            tokens = sum(len(c.token_ids) for o in outputs if o.finished for c in o.outputs)
            self.steps.append((start, time.monotonic() - start, seqs, tokens, cpu, time.process_time()))
            return outputs

        llm_engine.step = traced_step

    def write(self, sampler_id: int, max_num_seqs: int) -> None:
        out = os.environ.get(TRACE_DIR_ENV)
        if not out:
            return
        path = Path(out) / f"trace-{sampler_id}-{os.getpid()}.json"
        path.write_text(
            json.dumps(
                {
                    "max_num_seqs": max_num_seqs,
                    "steps": self.steps,
                    "screen_at": self.screen_at,
                    "screened_at": self.screened_at,
                    "group_at": self.group_at,
                }
            )
        )


def _key(epoch: int, prompt_id: int) -> str:
    return f"{epoch}/{prompt_id}"


class TracedLoop(SamplerLoop):
    """The continuous sampler with the trace."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trace = _Trace(self.engine._engine, self.engine.max_num_seqs)

    def _open(self, work: PromptWork, count: int, version: int, eval_version: int | None) -> None:
        if eval_version is None and work.stage == "screen":
            self.trace.screen_at.setdefault(_key(work.epoch, work.prompt_id), time.monotonic())
        super()._open(work, count, version, eval_version)

    def _emit(self, msg: Message) -> None:
        super()._emit(msg)
        if isinstance(msg, RolloutGroup):
            self.trace.group_at[_key(msg.epoch, msg.prompt_id)] = time.monotonic()
        elif isinstance(msg, ScreenReport):
            self.trace.screened_at[_key(msg.epoch, msg.prompt_id)] = time.monotonic()

    def close(self) -> None:
        self.trace.write(self.sampler_id, self.engine.max_num_seqs)
        super().close()


class BatchedLoop(TracedLoop):
    """One blocking generation call per round (the sampler before the continuous one), traced alike."""

    def step(self) -> bool:
        """One round: messages, weights, a work request (its answer awaited briefly), one call, its scores."""
        self._drain(0.0)
        if self.stopping is not None:
            return False
        self._maybe_update()  # nothing is in flight between two rounds: every mode loads at once
        self._maybe_request_work()
        deadline = time.monotonic() + WORK_ANSWER_WAIT_S
        while self.request_sent_at is not None and self.stopping is None and time.monotonic() < deadline:
            self._drain(max(0.0, deadline - time.monotonic()))
        self._heartbeat()
        self.sync.check_wait()
        if not self.sync.weights_ok:
            self.clock.switch("idle_weights")
            self._drain(0.05)
            return self.stopping is None
        evals = [(work, work.num_screen, version) for work, version in self.eval_items]
        self.eval_items = []
        batch = [(work, count, None) for work, count in self.assembler.next_batch(self.config.rollout.gen_batch_size)]
        if not batch and not evals:
            self.clock.switch("idle_weights" if self.bound_wait or self.pending_update else "idle_work")
            self._drain(IDLE_WAIT_S)
            return self.stopping is None
        for part in (evals, batch):  # evaluation in a call of its own, as before
            if part:
                self._round(part)
        return self.stopping is None

    def _round(self, batch: list[tuple[PromptWork, int, int | None]]) -> None:
        """One `Engine.generate` call for `batch` ((work, samples, eval version)), then score all of it."""
        version = self.engine.version
        now = time.monotonic()
        ids = []
        for work, count, eval_version in batch:
            if eval_version is None and work.stage == "screen":
                self.trace.screen_at.setdefault(_key(work.epoch, work.prompt_id), now)
            ids.append(self.book.open(work, count, version, eval_version))
            self.counters["requests"] += count
        self.clock.switch("evaluating" if batch[0][2] is not None else "generating")
        completions = self.engine.generate(
            [work.prompt_token_ids for work, _, _ in batch], [count for _, count, _ in batch], self.settings
        )
        done = []
        for rids, comps in zip(ids, completions, strict=True):
            for rid, completion in zip(rids, comps, strict=True):
                found = self.book.finish(rid)
                assert found is not None, rid
                stage, index, submitted = found
                done.append((stage, index, completion, submitted, self.engine.version))
                self.counters["generated_tokens"] += len(completion.token_ids)
        self.scorer.submit(done)
        self.clock.switch("scoring")
        while self.scorer.pending:  # the reward pool bounds each score (pipeline.reward_timeout_s)
            self._collect_scores(IDLE_WAIT_S)
