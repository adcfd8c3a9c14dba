"""The reward host: a process of its own that decodes the sampler's finished samples and keeps the reward workers
busy, so that none of that Python runs in the engine's process.

```
  sampler process (engine's core)                 reward host (other cores)            reward workers
  Scorer.submit ── ("items", tickets, ...) ──pipe──► decode, RewardPool.submit ──────► score, one item each
  Scorer.collect ◄─ ("scores", {ticket: s}, stats) ── RewardPool.poll ◄──────────────── answers
  Scorer.close ──── None ─────────────────────────► close the pool, exit (also on EOF: the sampler is gone)
```
Why a process and not a thread: the reward pool is driven by a loop that wakes at every worker answer (hundreds
of times a second), and a thread of the sampler's process takes the GIL at each wake. The engine step is
Python between its torch calls, so every wake can hold it up: with a pump thread the sampler pipeline kept 0.85 of
the bare engine, with scores made instantly (no pool, no pump) 0.90, with this host 0.90 (3 pairs each; 0.902
over 5 pairs; `benchmarks/sampler_throughput.py --compile --dtype bfloat16 --rounds 8`, 2026-12-05). Here the
sampler's share is one pickled message per engine step and the messages it receives; the decoding moves out
as well.

Messages, sampler to host (msgpack): ("items", tickets, token ids (int32 bytes, the samples one after the other),
their lengths, ground_truths, data_sources, extras, counted), or None to stop. Host to sampler (the pipe's own
pickling): ("ready", pin_error) once, then ("scores", {ticket: score}, {source: SourceStats}) as workers answer,
at most HOST_BATCH_S after the first of them (the stats of the counted items scored since the previous message),
or ("failed", text) once before it exits on an error. The host exits when the sampler's end of the pipe closes
(the sampler died); the workers exit when the host is gone (`speed_async.rewards.worker`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np

from speed_async.rewards import RewardItem, RewardPool

HOST_WAIT_S = 0.005
"""Longest wait for a message or a worker's answer while items are being scored (deadlines are checked after it)."""
HOST_IDLE_WAIT_S = 0.5
"""Longest wait for a message while nothing is being scored."""
HOST_BATCH_S = 0.01
"""Scores wait up to this long for more before they go to the sampler in one message (at once when nothing else
is being scored): each message costs the engine's process a read, and the sampler reads once an engine step anyway."""


@dataclass(frozen=True)
class HostSpec:
    """What the host needs to start: the pool's settings, the tokenizer, the cores."""

    tokenizer_path: str
    """The HF tokenizer that decodes the token ids."""
    num_workers: int
    timeout_s: float
    functions: Mapping[str, str] = field(default_factory=dict)
    worker_cpus: frozenset[int] | None = None
    host_cpus: frozenset[int] | None = None


def serve(conn: Connection, spec: HostSpec) -> None:
    """The host's main (the target of its process): start the pool, then score until told to stop."""
    pin_error = None
    if spec.host_cpus:
        try:
            os.sched_setaffinity(0, spec.host_cpus)
        except OSError as err:  # scoring still works where it runs now
            pin_error = f"pinning it to {set(spec.host_cpus)} failed: {err}"
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path)
        pool = RewardPool(
            num_workers=spec.num_workers,
            timeout_s=spec.timeout_s,
            cpus=set(spec.worker_cpus) if spec.worker_cpus else None,
            functions=spec.functions,
        )
    except BaseException as err:
        conn.send(("failed", f"the reward workers did not start: {type(err).__name__}: {err}"))
        return
    try:
        conn.send(("ready", pin_error))
        _loop(conn, pool, tokenizer)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the sampler is gone
    except BaseException as err:  # e.g. a replacement worker that fails to start
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(err).__name__}: {err}"))
    finally:
        pool.close()


def _loop(conn: Connection, pool: RewardPool, tokenizer: Any) -> None:
    theirs: dict[int, int] = {}  # pool ticket -> the sampler's ticket
    scored: dict[int, float] = {}  # the sampler's ticket -> score, not sent yet
    due = 0.0  # when `scored` goes out at the latest
    while True:
        wait_s = HOST_WAIT_S if theirs else HOST_IDLE_WAIT_S
        if scored:
            wait_s = min(wait_s, max(0.0, due - time.monotonic()))
        pool.wait_for_answer(wait_s, also=(conn,))
        while conn.poll():
            msg = msgpack.unpackb(conn.recv_bytes())
            if msg is None:
                return
            _, tickets, flat, lengths, truths, sources, extras, counted = msg
            ends = np.cumsum(lengths).tolist()
            tokens = np.frombuffer(flat, dtype=np.int32).tolist()
            texts = tokenizer.batch_decode([tokens[e - n : e] for e, n in zip(ends, lengths, strict=True)],
                                           skip_special_tokens=True)  # fmt: skip
            items = [RewardItem(*fields) for fields in zip(texts, truths, sources, extras, counted, strict=True)]
            for ours, ticket in zip(pool.submit(items), tickets, strict=True):
                theirs[ours] = ticket
        if theirs:
            done = pool.poll(0.0)
            if done and not scored:
                due = time.monotonic() + HOST_BATCH_S
            scored.update((theirs.pop(t), s) for t, s in done.items())
        if scored and (not theirs or time.monotonic() >= due):
            conn.send(("scores", scored, pool.take_source_stats()))
            scored = {}
