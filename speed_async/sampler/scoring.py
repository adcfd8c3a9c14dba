"""Scoring beside generation: finished samples go to the reward host, scored responses come back later.

The engine hands over each sample as it finishes; `Scorer.submit` sends the token ids of one engine step's
finished samples, in one message, to the reward host (`speed_async.sampler.score_host`: a process of its own on
the reward workers' cores other than the engine's, which decodes them and keeps the reward workers
(`speed_async.rewards.RewardPool`: the data source's reward function, reward.functions or builtin, else
Math-Verify) busy without waiting. `Scorer.collect` takes the scores that came back so far (the sampler calls it
after every engine step) and returns each as a `Response` carrying its reward (score + DAPO overlong penalty)
and the versions of the weights that generated it. So the engine never waits for a score, and no scoring work
(decoding, the pool's bookkeeping at each worker answer) runs in the engine's process: scoring runs on other
cores while the next engine steps run. `Scorer.take_stats` hands over what the pool counted per data source of the
training samples (evaluation samples are not counted), as the host reports it with the scores.

Every wait is bounded: the host must say it is ready within `HOST_STARTUP_S`; a host that dies, or reports that
its pool failed (e.g. a replacement worker that cannot start), makes the next `collect` raise, naming it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.util
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import msgpack
import numpy as np

from speed_async.config import Config
from speed_async.curriculum.groups import Response
from speed_async.rewards import SourceStats, effective_functions, overlong_penalty
from speed_async.sampler.inflight import Stage
from speed_async.sampler.score_host import HostSpec, serve

log = logging.getLogger("speed_async.sampler")
HOST_STARTUP_S = 120.0
"""Longest wait for the reward host to start its workers (each imports its reward functions; Math-Verify takes a
few seconds) and say it is ready."""
HOST_STOP_S = 5.0
"""Longest wait for the reward host to exit when asked, before it is killed."""


@dataclass(frozen=True)
class _Owner:
    stage: Stage
    index: int
    completion: object  # engine.Completion: token_ids, logprobs, finish_reason
    version_min: int
    """The engine's version when the request was submitted."""
    version_max: int
    """The engine's version when it finished."""


class Scorer:
    """The reward host process + the samples it is scoring, by ticket."""

    def __init__(
        self,
        config: Config,
        tokenizer_path: str,
        *,
        cpus: set[int] | None = None,
        host_cpus: set[int] | None = None,
    ) -> None:
        """Start the reward host (without waiting for it: the first `submit` or `collect` does). The HF tokenizer
        at `tokenizer_path` decodes the samples' token ids; the workers run on `cpus`, the host on `host_cpus`
        (default: the caller's cores)."""
        spec = HostSpec(
            num_workers=config.pipeline.reward_workers,
            timeout_s=config.pipeline.reward_timeout_s,
            functions=effective_functions(config.reward.functions),
            tokenizer_path=tokenizer_path,
            worker_cpus=frozenset(cpus) if cpus else None,
            host_cpus=frozenset(host_cpus) if host_cpus else None,
        )
        context = multiprocessing.get_context("spawn")  # the caller holds threads and ZeroMQ sockets: no fork
        self._conn, child = context.Pipe()
        # Not a daemon: daemonic processes may not start the reward workers. `close` stops it; if this process
        # dies, the host reads EOF and exits.
        self.process = context.Process(target=serve, args=(child, spec), name="reward-host", daemon=False)
        self.process.start()
        child.close()
        # multiprocessing joins non-daemon children at interpreter exit, after running its finalizers: this one
        # stops the host first when the sampler exits without `close` (an error on the way out).
        self._stop = multiprocessing.util.Finalize(self, _stop_host, args=(self._conn, self.process), exitpriority=10)
        self._started = time.monotonic()
        self._ready = False
        self.buffer = config.algorithm.overlong_buffer
        self.max_len = config.rollout.max_response_length
        self._owners: dict[int, _Owner] = {}
        self._tickets = itertools.count()
        self._stats: dict[str, SourceStats] = {}

    @property
    def pending(self) -> int:
        """Samples submitted and not yet collected."""
        return len(self._owners)

    def submit(self, finished: list[tuple[Stage, int, object, int, int]]) -> None:
        """Queue (stage, sample index, completion, version at submission, version at finish) for scoring."""
        if not finished:
            return
        self._wait_ready()
        tickets = [next(self._tickets) for _ in finished]
        for ticket, owner in zip(tickets, finished, strict=True):
            self._owners[ticket] = _Owner(*owner)
        works = [stage.work for stage, *_ in finished]
        tokens = [np.asarray(c.token_ids, dtype=np.int32) for _, _, c, _, _ in finished]
        msg = (
            "items",
            tickets,
            np.concatenate(tokens).tobytes(),
            [len(t) for t in tokens],
            [w.ground_truth for w in works],
            [w.data_source for w in works],
            [w.extra for w in works],
            [not stage.is_eval for stage, *_ in finished],
        )
        self._send(msg)

    def _send(self, msg: object) -> None:
        """msgpack, with the token ids as one buffer, not the pipe's pickling of an array per sample: pickling that
        message (a ForkingPickler per message, a numpy reduction per array) was 0.74% of the sampler loop's py-spy
        samples (2026-12-05; all of `submit` 1.09%), run cold after each engine step."""
        try:
            self._conn.send_bytes(msgpack.packb(msg))
        except OSError as err:
            raise self._gone() from err

    def _gone(self) -> RuntimeError:
        """The error for a host whose pipe broke, with its exit code."""
        self.process.join(timeout=1)
        code = self.process.exitcode
        state = "still running" if code is None else f"exit code {code}"
        return RuntimeError(f"the reward host (pid {self.process.pid}) is gone: {state}")

    def _wait_ready(self) -> None:
        """Wait (at most what is left of HOST_STARTUP_S since the start) for the host's first message."""
        while not self._ready:
            left = HOST_STARTUP_S - (time.monotonic() - self._started)
            if left <= 0:
                raise RuntimeError(
                    f"the reward host (pid {self.process.pid}) did not start its reward workers within "
                    f"{HOST_STARTUP_S:g} s"
                )
            self._receive(min(left, 1.0))

    def _receive(self, timeout_s: float) -> dict[int, float]:
        """The host's messages that arrived (waiting up to `timeout_s` for the first): scores by ticket."""
        found: dict[int, float] = {}
        try:
            ready = self._conn.poll(timeout_s)
            while ready:
                msg = self._conn.recv()
                if msg[0] == "scores":
                    found.update(msg[1])
                    for source, stats in msg[2].items():
                        self._stats.setdefault(source, SourceStats()).merge(stats)
                elif msg[0] == "ready":
                    self._ready = True
                    if msg[1]:
                        log.warning("the reward host process stays on its cores: %s", msg[1])
                else:  # ("failed", text): the host exits after it
                    raise RuntimeError(f"the reward pool failed: {msg[1]}")
                ready = self._conn.poll(0)
        except (EOFError, OSError) as err:
            raise self._gone() from err
        return found

    def collect(self, timeout_s: float) -> list[tuple[Stage, int, Response]]:
        """The responses scored so far (waiting up to `timeout_s` for the first), as (stage, index, response)."""
        self._wait_ready()
        out = []
        for ticket, score in self._receive(timeout_s if self._owners else 0.0).items():
            owner = self._owners.pop(ticket, None)
            if owner is None:
                continue
            c = owner.completion
            length = len(c.token_ids)
            reward = score + (overlong_penalty(length, self.max_len, self.buffer) if self.buffer > 0 else 0.0)
            response = Response(
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                score=float(score),
                reward=float(reward),
                version_min=owner.version_min,
                version_max=owner.version_max,
            )
            out.append((owner.stage, owner.index, response))
        return out

    def take_stats(self) -> dict[str, SourceStats]:
        """Per data source, the training samples scored since the previous call (as the host reported them)."""
        stats, self._stats = self._stats, {}
        return stats

    def forget(self) -> None:
        """Drop every pending sample (their late scores are ignored)."""
        self._owners.clear()

    def close(self) -> None:
        """Stop the reward host and its workers (killed if they do not exit within HOST_STOP_S)."""
        self._stop()


def _stop_host(conn: Connection, process: BaseProcess) -> None:
    """Ask the host to exit; kill it if it has not within HOST_STOP_S."""
    with contextlib.suppress(OSError):  # already gone
        conn.send_bytes(msgpack.packb(None))
    process.join(timeout=HOST_STOP_S)
    if process.is_alive():
        process.kill()
        process.join(timeout=HOST_STOP_S)
    conn.close()
