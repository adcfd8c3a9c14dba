"""The streaming limit for benchmarks/sampler_throughput.py: an engine process that does only what any streaming
sampler must do between two engine steps, and nothing of what this project's sampler adds.

Its process (pinned as a sampler's engine) takes whole prompts (`n` requests each) from this process as they come,
submits them with `Engine.submit_many`, runs engine steps, and sends the finished samples (token ids, log-probs,
finish reason) back after each step. This process keeps its queue as the sampler keeps the engine's (up to
max_num_seqs plus a moving average of the requests finished per step). No scoring, request book, groups, wire
or sockets: what separates it from the bare engine (one `generate` call with every request added up front) is
the price of streaming itself, which a sampler cannot avoid; what separates the pipeline from it is the sampler's
own work.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import tempfile
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import numpy as np

from speed_async.sampler.loop import QUEUE_EMA_WEIGHT

STREAM_TIMEOUT_S = 600.0
"""Longest wait for the stream engine's process to start, or to send anything during a slice."""


def stream_server(fds: str, model: str, max_tokens: int, eager: bool, dtype: str, helpers: set[int]) -> None:
    """The engine's process (already pinned to the engine's cores), talking over the pipe ends `fds` ("in,out"):
    submit what arrives, step while anything is unfinished, send back what finished."""
    from speed_async.sampler.engine import Engine, SamplingSettings, enable_cpu_huge_pages

    enable_cpu_huge_pages()  # as a sampler on CPU does
    fd_in, fd_out = (int(f) for f in fds.split(","))
    recv, send = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    engine = Engine(model, dtype=dtype, max_model_len=256, enforce_eager=eager, helper_cpus=helpers)
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=None)
    send.send(("ready", engine.max_num_seqs))
    while True:
        while recv.poll(0 if engine.num_unfinished else None):
            batch = recv.recv()
            if batch is None:
                engine.close()
                return
            for ids, prompt in batch:
                engine.submit_many(ids, prompt, settings)
        finished = engine.step()
        if finished:
            send.send([(rid, c.token_ids, c.logprobs, c.finish_reason) for rid, c in finished])


class StreamArm:
    """The stream engine's process, fed by this process; tokens counted as the samples come back."""

    def __init__(self, argv: list[str], env: dict[str, str], prompts: list[np.ndarray], n: int) -> None:
        """`argv`: the benchmark's command line for its `--arm stream` process, without `--fds`."""
        from speed_async.lifetime import preexec_die_with_parent

        self.prompts, self.n = prompts, n
        self.recv_from, to_self = Pipe(duplex=False)
        from_self, self.send_to = Pipe(duplex=False)
        fds = (from_self.fileno(), to_self.fileno())
        self.log = tempfile.NamedTemporaryFile(prefix="bench-stream-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([*argv, "--fds", f"{fds[0]},{fds[1]}"], pass_fds=fds, stdout=self.log,
                                     stderr=self.log, env=env, preexec_fn=preexec_die_with_parent())  # fmt: skip
        from_self.close()
        to_self.close()
        ready = self._receive()
        self.capacity = int(ready[1])
        self.requests = 0
        self.run(1)  # warm-up: one round, as the other arms

    def _receive(self) -> object:
        if not self.recv_from.poll(STREAM_TIMEOUT_S):
            raise RuntimeError(
                f"the stream engine's process sent nothing within {STREAM_TIMEOUT_S:g} s; see {self.log.name}"
            )
        try:
            return self.recv_from.recv()
        except EOFError:
            code = self.proc.wait()
            raise RuntimeError(f"the stream engine's process exited (code {code}); see {self.log.name}") from None

    def run(self, rounds: int) -> dict[str, float]:
        """Generate `rounds` rounds of every prompt, `n` samples each; its tokens and seconds."""
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            todo = [p for _ in range(rounds) for p in self.prompts]
            todo.reverse()
            total, done, in_flight, tokens, per_step = len(todo) * self.n, 0, 0, 0, 0.0
            start = time.perf_counter()
            while done < total:
                room = self.capacity + math.ceil(per_step) - in_flight
                batch = []
                while todo and room >= self.n:
                    ids = [f"{self.requests}-{i}" for i in range(self.n)]
                    batch.append((ids, todo.pop()))
                    self.requests += 1
                    room -= self.n
                    in_flight += self.n
                if batch:
                    self.send_to.send(batch)
                finished = self._receive()
                assert isinstance(finished, list)
                per_step += QUEUE_EMA_WEIGHT * (len(finished) - per_step)  # the sampler's queue policy
                in_flight -= len(finished)
                done += len(finished)
                tokens += sum(len(f[1]) for f in finished)
            seconds = time.perf_counter() - start
            return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone: the error above says so
                os.kill(self.proc.pid, signal.SIGSTOP)

    def close(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.send_to.send(None)
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.send_to.close()
        self.recv_from.close()
