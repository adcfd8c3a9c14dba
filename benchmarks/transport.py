"""Transport: RolloutGroup messages/s and MB/s over the real ZeroMQ PUSH/PULL path, and its share of an RL step.

A sender process (like a sampler) encodes and sends RolloutGroup messages through `speed_async.transport`'s
PushSocket over tcp loopback; this process (like learner rank 0) receives them with a PullSocket, which decodes
and validates every frame. Each case runs with and without an HMAC key, for a group shaped like the paper's
(24 responses x 3072 tokens) and one shaped like the tiny config's (n + n_continue responses x
max_response_length tokens). Frame encode and decode costs are also timed alone, in this process.

The step share: bytes of one RL step (train_batch_size groups of the run's shape) / the measured bandwidth,
divided by the run's median step time (from `--run-dir DIR/metrics.jsonl`, else from one quick k = 1 run).

Prints a table, then one JSON line (keys `step_share`, `msgs_per_s`, `mb_per_s` for the run's shape without a
key, as the launcher runs on loopback, plus every case's numbers).

    python benchmarks/transport.py [--quick] [--run-dir RUN_DIR] [--out benchmarks/results/transport_<m>_<d>.md]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine  # noqa: E402
from benchmarks.throughput import capture_table, default_model, run_train, summarize, write_markdown  # noqa: E402

KEY = b"benchmark-shared-key-0123456789ab"
WARMUP_MSGS = 20
RECV_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Shape:
    """The size of one RolloutGroup."""

    name: str
    responses: int
    response_tokens: int
    prompt_tokens: int


def make_group(shape: Shape, seed: int = 0) -> Any:
    """A valid RolloutGroup of `shape` with random token ids and log-probs (incompressible, like real ones)."""
    from speed_async.protocol import RolloutGroup

    rng = np.random.default_rng(seed)
    total = shape.responses * shape.response_tokens
    return RolloutGroup(
        sampler_id=0,
        prompt_id=1,
        epoch=0,
        data_source="benchmark",
        prompt_token_ids=rng.integers(0, 150_000, shape.prompt_tokens, dtype=np.int32),
        response_token_ids=rng.integers(0, 150_000, total, dtype=np.int32),
        response_lengths=np.full(shape.responses, shape.response_tokens, dtype=np.int32),
        response_logprobs=-rng.exponential(1.0, total).astype(np.float32),
        rewards=rng.integers(0, 2, shape.responses).astype(np.float32),
        scores=rng.integers(0, 2, shape.responses).astype(np.float32),
        finish_reasons=["length"] * shape.responses,
        version_min=np.zeros(shape.responses, dtype=np.int32),
        version_max=np.zeros(shape.responses, dtype=np.int32),
        num_screen=min(4, shape.responses),
    )


def _sender(endpoint: str, shape: Shape, key: bytes | None, count: int, done: Any) -> None:
    """Child process: encode and send `count` messages (each send encodes, as a sampler does), then keep the
    socket open until the receiver sets `done` (closing earlier could drop queued frames after the linger)."""
    from speed_async.transport import Context, PushSocket

    msg = make_group(shape)
    with Context() as ctx:
        push = PushSocket(ctx, endpoint, key=key)
        for _ in range(count):
            push.send(msg, timeout_s=RECV_TIMEOUT_S)
        done.wait(RECV_TIMEOUT_S)
        push.close()


def stream(shape: Shape, key: bytes | None, count: int) -> dict[str, float]:
    """Messages/s and MB/s of `count` messages from a sender process to this one (after a warm-up)."""
    from speed_async.protocol import RolloutGroup, encode
    from speed_async.transport import Context, PullSocket

    frame_bytes = len(encode(make_group(shape), key))
    with Context() as ctx:
        pull = PullSocket(ctx, key=key)
        endpoint = pull.bind_endpoint("127.0.0.1", 0)
        spawn = mp.get_context("spawn")
        done = spawn.Event()
        proc = spawn.Process(target=_sender, args=(endpoint, shape, key, WARMUP_MSGS + count, done))
        proc.start()
        try:
            for i in range(WARMUP_MSGS + count):
                if i == WARMUP_MSGS:
                    start = time.perf_counter()
                msg = pull.recv(RECV_TIMEOUT_S)
                if not isinstance(msg, RolloutGroup):
                    raise RuntimeError(
                        f"{shape.name}: message {i} not received within {RECV_TIMEOUT_S} s "
                        f"(got {type(msg).__name__}; rejected frames: {dict(pull.rejected)})"
                    )
            seconds = time.perf_counter() - start
        finally:
            done.set()
            proc.join(timeout=RECV_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return {"msgs_per_s": count / seconds, "mb_per_s": count * frame_bytes / seconds / 1e6, "frame_bytes": frame_bytes}


def codec_costs(shape: Shape, key: bytes | None, count: int) -> dict[str, float]:
    """Microseconds to encode and to decode (with validation) one frame, in this process."""
    from speed_async.protocol import decode, encode

    msg = make_group(shape)
    frame = encode(msg, key)
    start = time.perf_counter()
    for _ in range(count):
        encode(msg, key)
    encode_us = (time.perf_counter() - start) / count * 1e6
    start = time.perf_counter()
    for _ in range(count):
        decode(frame, key=key)
    decode_us = (time.perf_counter() - start) / count * 1e6
    return {"encode_us": encode_us, "decode_us": decode_us}


def measure(shape: Shape, key: bytes | None, count: int, repeats: int) -> dict[str, float]:
    """The median over `repeats` streams, plus the codec costs."""
    runs = [stream(shape, key, count) for _ in range(repeats)]
    best = {k: statistics.median(r[k] for r in runs) for k in ("msgs_per_s", "mb_per_s")}
    return {**best, "frame_bytes": float(runs[0]["frame_bytes"]), **codec_costs(shape, key, max(10, count // 10))}


def run_step_time(run_dir: Path | None, config: str, model: str | None) -> tuple[float, dict[str, Any], Path]:
    """(median step seconds, resolved config, run dir) of `run_dir`, or of one quick k = 1 run made here."""
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-transport-")) / "run"
        overrides = ["trainer.total_steps=5", "trainer.eval_every=0", "rollout.enforce_eager=true"]
        run_train(config, model or default_model(), run_dir, [*overrides, "pipeline.max_staleness=1"])
    resolved = run_dir / "resolved_config.json"
    if not resolved.is_file():
        raise FileNotFoundError(f"{resolved} does not exist: --run-dir must be a finished run directory")
    return summarize(run_dir)["step_s"], json.loads(resolved.read_text()), run_dir


def main() -> None:
    """Measure every case, print the table and the JSON line, optionally write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and repeats (under 3 minutes)")
    parser.add_argument("--run-dir", type=Path, help="a finished run: step time and group shape come from it")
    parser.add_argument("--config", default="configs/tiny-cpu.toml", help="config of the quick run without --run-dir")
    parser.add_argument("--model", default=None, help="HF model dir of that run (default: the embedded tiny model)")
    parser.add_argument("--msgs", type=int, default=4000, help="messages per stream of the run's shape")
    parser.add_argument("--paper-msgs", type=int, default=400, help="messages per stream of the paper's shape")
    parser.add_argument("--paper-prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write a results markdown file here")
    args = parser.parse_args()
    if args.quick:
        args.msgs, args.paper_msgs, args.repeats = 1000, 100, 1
    for name in ("msgs", "paper_msgs", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
    step_s, cfg, run_dir = run_step_time(args.run_dir, args.config, args.model)
    rollout, batch = cfg["rollout"], cfg["data"]["train_batch_size"]
    responses = rollout["n"] + (rollout["n_continue"] if cfg["curriculum"]["mode"] == "speed" else 0)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"time/step"' in x]
    mean_len = round(statistics.mean(r["train/response_length_mean"] for r in steps))
    run_shape = Shape("run", responses, max(1, mean_len), 64)
    paper = Shape("paper", 24, 3072, args.paper_prompt_tokens)
    cases: dict[str, dict[str, float]] = {}
    for shape, count in ((run_shape, args.msgs), (paper, args.paper_msgs)):
        for key in (None, KEY):
            name = f"{shape.name}_{'hmac' if key else 'nokey'}"
            cases[name] = measure(shape, key, count, args.repeats)
            cases[name]["step_transport_s"] = batch * cases[name]["frame_bytes"] / (cases[name]["mb_per_s"] * 1e6)
            print(f"{name}: {cases[name]['msgs_per_s']:.0f} msgs/s, {cases[name]['mb_per_s']:.1f} MB/s", flush=True)
    head = cases["run_nokey"]
    step_share = head["step_transport_s"] / step_s
    print(f"\ntransport: tcp loopback, PUSH/PULL, decode with validation; run {run_dir} ({step_s:.2f} s/step)")
    shapes = {"run": run_shape, "paper": paper}
    table = capture_table(
        ["case", "responses x tokens", "frame KB", "msgs/s", "MB/s", "encode us", "decode us", f"s per {batch} groups"],
        [
            [name, f"{shapes[name.split('_')[0]].responses}x{shapes[name.split('_')[0]].response_tokens}",
             c["frame_bytes"] / 1e3, c["msgs_per_s"], c["mb_per_s"], c["encode_us"], c["decode_us"],
             c["step_transport_s"]]
            for name, c in cases.items()
        ],
    )  # fmt: skip
    summary = (
        f"run shape, no key: {batch} groups/step = {batch * head['frame_bytes'] / 1e6:.3f} MB -> "
        f"{head['step_transport_s'] * 1e3:.2f} ms of a {step_s:.2f} s step: step_share {step_share:.2e}\n"
    )
    print(summary, end="")
    result: dict[str, Any] = {
        "benchmark": "transport",
        "step_share": step_share,
        "msgs_per_s": head["msgs_per_s"],
        "mb_per_s": head["mb_per_s"],
        "step_s": step_s,
        "train_batch_size": batch,
        "run_dir": str(run_dir),
        **{f"{name}_{k}": v for name, c in cases.items() for k, v in c.items()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
    }
    emit(result)
    if args.out:
        notes = (
            f"Shapes: run = {run_shape.responses} responses x {run_shape.response_tokens} tokens (the run's mean "
            f"response length) + {run_shape.prompt_tokens} prompt tokens; paper = 24 x 3072 + "
            f"{paper.prompt_tokens} prompt tokens. Token ids and log-probs are random (msgpack does not compress "
            "them, so frame sizes are those of real groups). MB = 10^6 bytes of frames. Throughput is the median "
            f"of {args.repeats} stream(s) after {WARMUP_MSGS} warm-up messages; sender and receiver are separate "
            "processes, not pinned, on a shared machine."
        )
        command = shlex.join([Path(sys.executable).name, *sys.argv])
        write_markdown(
            args.out, "Transport: RolloutGroup over ZeroMQ PUSH/PULL", command, table + summary, result, notes
        )
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
