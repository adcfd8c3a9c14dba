"""Long-tail workload: the continuous sampler against one blocking generation call per round.

The workload is `builtin:sums` (multi-operand sums worked column by column; responses from about 20 to over 400
tokens, median 39) with the model warm-started on it (`builtin:tiny-long`), SPEED screening (n_init 4,
n_continue 12). Two arms, the same engine settings (configs/tiny-cpu-longtail.toml: max_num_seqs 128,
gen_batch_size 32, torch.compile, dtype auto; `--set` changes them for both), the same prompts:

- continuous: the sampler as it is (`SamplerLoop`): requests submitted as soon as they are known, a
  continuation as soon as its screen is scored and the dispatcher says go (here: at once, for every qualified
  screen), new screens whenever the engine has room;
- batched: the old shape (`benchmarks/long_tail_loops.BatchedLoop`): one blocking `Engine.generate` per round of
  every waiting continuation plus up to gen_batch_size new screens; a round ends with its longest response.

Part 1, the sampler alone: this process plays the dispatcher for two real sampler processes (one per arm, both
started first) and hands each arm the same prompt sets, one segment at a time, alternating A B B A ... so that
the load of the machine hits both alike (after an untimed warm-up segment each). A segment ends when every
prompt of it is rejected at screening or its group has arrived. From the samplers' traces (every vLLM engine
step: its sequences, the tokens it finished, the process's CPU time): tokens/s, tokens per CPU-second of the
sampler process (what a dedicated core would give: on a shared machine a process at low priority loses wall time
to others in bursts, its CPU seconds stay its own), engine occupancy (sequences in the batch / max_num_seqs,
time-weighted over the segment, idle time included) and its course over the segment, and the time from a
prompt's screen submission to its group's arrival. Part 2, RL step time at k = 1: `speed-async train` with each
arm (`--steps` RL steps; median seconds per step over the steps after the first two).

Prints a table, then one JSON line with `continuous_over_batched` (tokens/s, summed over the segments) and
`continuous_over_batched_cpu` (tokens per sampler CPU-second).

    python benchmarks/long_tail.py [--quick] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine, print_table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu-longtail.toml"
ARMS = {"continuous": "benchmarks.long_tail_loops:TracedLoop", "batched": "benchmarks.long_tail_loops:BatchedLoop"}
SEGMENT_TIMEOUT_S = 1800.0
CORE = str(max(os.sched_getaffinity(0)))
TRACE_DIR_ENV = "SPEED_ASYNC_TRACE_DIR"
BINS = 10
"""Occupancy over a segment: the mean in each tenth of its duration."""


def _items(model: str, split: str, count: int, offset: int, epoch: int, overrides: list[str]) -> list[Any]:
    """`count` prompts of builtin:sums/<split> from `offset`, as work items of `epoch`."""
    from transformers import AutoTokenizer

    from speed_async.config import load_config
    from speed_async.data.sums import load_split
    from speed_async.data.templates import render_prompt
    from speed_async.protocol import WorkItem

    rollout = load_config(CONFIG, overrides).rollout
    tokenizer = AutoTokenizer.from_pretrained(model)
    return [
        WorkItem(
            prompt_id=offset + i, epoch=epoch, data_source="sums",
            prompt_token_ids=np.array(tokenizer.encode(render_prompt(r)), np.int32), ground_truth=r.ground_truth,
            num_screen=rollout.n, num_continue=rollout.n_continue,
        )
        for i, r in enumerate(load_split(split)[offset : offset + count])
    ]  # fmt: skip


class Arm:
    """One sampler process and the sockets this process serves it on."""

    def __init__(self, name: str, ctx: Any, model: str, work_dir: Path, overrides: list[str]) -> None:
        from launcher.roles import SAMPLER_LOOP_ENV
        from launcher.standalone import start_sampler
        from speed_async.config import load_config
        from speed_async.transport import PullSocket, RouterSocket

        self.name = name
        self.router, self.pull = RouterSocket(ctx), PullSocket(ctx)
        endpoints = {
            "work": self.router.bind_endpoint("127.0.0.1", 0),
            "results": self.pull.bind_endpoint("127.0.0.1", 0),
        }
        config = load_config(CONFIG, [*overrides, "pipeline.reward_workers=1"])
        self.trace_dir = work_dir / name
        self.trace_dir.mkdir(parents=True)
        # The engine's threads on one core, the last, as a training run's sampler has them (launcher.roles);
        # only one arm runs at a time. Its reward worker floats.
        env = {SAMPLER_LOOP_ENV: ARMS[name], TRACE_DIR_ENV: str(self.trace_dir), "VLLM_CPU_OMP_THREADS_BIND": CORE}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.proc = start_sampler(config, self.trace_dir, Path(model), 0, endpoints)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        self.identity: bytes | None = None

    def idle(self) -> None:
        """While another arm runs: answer work requests with NoWork and take heartbeats (a sampler left waiting
        would declare the learner unresponsive, a full PUSH queue would block it)."""
        from speed_async.protocol import NoWork, WorkRequest

        while (got := self.router.recv(0.0)) is not None:
            self.identity, msg = got
            if isinstance(msg, WorkRequest):
                self.router.send_to(self.identity, NoWork(retry_after_s=0.5, reason="another arm's turn"))
        while self.pull.recv(0.0) is not None:
            pass

    def segment(self, items: list[Any], others: list[Arm]) -> tuple[float, float]:
        """Serve `items` until each is rejected or its group arrived (`others` kept idle); (monotonic start, end)."""
        from speed_async.protocol import (
            ContinueDecision,
            GroupDropped,
            NoWork,
            RolloutGroup,
            ScreenReport,
            WorkAssignment,
            WorkRequest,
        )  # fmt: skip

        queue, left = list(items), {(it.epoch, it.prompt_id) for it in items}
        start = time.monotonic()
        while left:
            if time.monotonic() - start > SEGMENT_TIMEOUT_S:
                raise TimeoutError(f"{self.name}: {len(left)} prompts unfinished after {SEGMENT_TIMEOUT_S:.0f} s")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the sampler exited with {self.proc.returncode}; see its log")
            for other in others:
                other.idle()
            got = self.router.recv(0.005)
            if got is not None:
                self.identity, msg = got
                if isinstance(msg, WorkRequest):
                    if queue:
                        handed, queue = queue[: msg.max_prompts], queue[msg.max_prompts :]
                        self.router.send_to(self.identity, WorkAssignment(items=handed, version=0))
                    else:
                        self.router.send_to(self.identity, NoWork(retry_after_s=0.05, reason="segment handed out"))
            msg = self.pull.recv(0.005)
            if isinstance(msg, ScreenReport) and msg.qualified and self.identity is not None:
                # The dispatcher's pacing answer: every qualified screen of a segment is continued at once.
                self.router.send_to(self.identity, ContinueDecision(prompt_id=msg.prompt_id, epoch=msg.epoch, go=True))
            if (isinstance(msg, ScreenReport) and not msg.qualified) or isinstance(msg, RolloutGroup | GroupDropped):
                left.discard((msg.epoch, msg.prompt_id))
        return start, time.monotonic()

    def stop(self) -> dict[str, Any]:
        """Shut the sampler down; its trace."""
        from launcher.standalone import kill_group
        from speed_async.protocol import Shutdown

        try:
            if self.identity is not None:
                self.router.send_to(self.identity, Shutdown(reason="benchmark done"))
            self.proc.wait(timeout=120)
        finally:
            kill_group(self.proc)
            self.router.close()
            self.pull.close()
        paths = list(self.trace_dir.glob("trace-*.json"))
        if len(paths) != 1:
            raise RuntimeError(f"{self.name}: {len(paths)} traces in {self.trace_dir}; see sampler-0.log there")
        return json.loads(paths[0].read_text())


def window_stats(trace: dict[str, Any], start: float, end: float, keys: set[str]) -> dict[str, Any]:
    """Tokens/s, occupancy and screen-to-group seconds of one segment [start, end] of a trace."""
    steps = [s for s in trace["steps"] if start <= s[0] < end]
    cap, span = trace["max_num_seqs"], end - start
    tokens = sum(s[3] for s in steps)
    busy = sum(s[1] for s in steps)
    cpu = max(s[5] for s in steps) - min(s[4] for s in steps)  # the sampler process's CPU seconds
    occupancy = sum(s[1] * s[2] for s in steps) / cap / span
    bins = np.zeros(BINS)
    for t0, dt, seqs, *_ in steps:  # each step's sequence-seconds into the tenth it started in
        bins[min(BINS - 1, int((t0 - start) / span * BINS))] += dt * seqs
    latency = [trace["group_at"][k] - trace["screen_at"][k] for k in keys if k in trace["group_at"]]
    return {
        "seconds": span,
        "tokens": tokens,
        "tokens_per_s": tokens / span,
        "cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu,
        "engine_busy": busy / span,
        "occupancy": occupancy,
        "occupancy_bins": (bins / cap / (span / BINS)).round(3).tolist(),
        "groups": len(latency),
        "screen_to_group_s": latency,
    }


def sampler_part(model: str, segments: int, per_segment: int, warmup: int, overrides: list[str]) -> dict[str, Any]:
    """Both arms on the same prompt sets, alternating (A B B A ...); per-arm totals and per-segment stats."""
    from speed_async.transport import Context

    ctx = Context()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-long-tail-"))
    arms = {name: Arm(name, ctx, model, work_dir, overrides) for name in ARMS}
    windows: dict[str, list[tuple[float, float, set[str]]]] = {name: [] for name in ARMS}
    try:
        warm = _items(model, "train", warmup, 0, epoch=0, overrides=overrides)
        for name, arm in arms.items():
            arm.segment(warm, [a for n, a in arms.items() if n != name])  # engine start-up, first calls: untimed
        for seg in range(segments):
            items = _items(model, "train", per_segment, warmup + seg * per_segment, epoch=1, overrides=overrides)
            keys = {f"{it.epoch}/{it.prompt_id}" for it in items}
            order = list(ARMS) if seg % 2 == 0 else list(reversed(ARMS))
            for name in order:
                start, end = arms[name].segment(items, [a for n, a in arms.items() if n != name])
                windows[name].append((start, end, keys))
                print(f"segment {seg} {name}: {end - start:.1f} s", flush=True)
    finally:
        traces = {}
        for name, arm in arms.items():
            with contextlib.suppress(RuntimeError):  # reported below; the other arm is stopped all the same
                traces[name] = arm.stop()
        ctx.close()
    missing = [name for name in ARMS if name not in traces]
    if missing:
        raise RuntimeError(f"no trace from {missing}: see sampler-0.log in {work_dir}/<arm>")
    out: dict[str, Any] = {}
    for name in ARMS:
        per = [window_stats(traces[name], s, e, k) for s, e, k in windows[name]]
        seconds = sum(p["seconds"] for p in per)
        latency = [x for p in per for x in p["screen_to_group_s"]]
        out[name] = {
            "seconds": seconds,
            "tokens": sum(p["tokens"] for p in per),
            "tokens_per_s": sum(p["tokens"] for p in per) / seconds,
            "tokens_per_cpu_s": sum(p["tokens"] for p in per) / sum(p["cpu_s"] for p in per),
            "occupancy": sum(p["occupancy"] * p["seconds"] for p in per) / seconds,
            "engine_busy": sum(p["engine_busy"] * p["seconds"] for p in per) / seconds,
            "occupancy_bins": np.mean([p["occupancy_bins"] for p in per], axis=0).round(3).tolist(),
            "groups": len(latency),
            "screen_to_group_median_s": statistics.median(latency) if latency else None,
            "screen_to_group_p90_s": float(np.percentile(latency, 90)) if latency else None,
            "segments": [{k: v for k, v in p.items() if k != "screen_to_group_s"} for p in per],
        }
    return out


def rl_part(model: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    """`speed-async train` at k = 1 with each arm's sampler; median seconds per RL step after the first two."""
    from benchmarks.runs import read_records, run_train
    from launcher.roles import SAMPLER_LOOP_ENV

    out = {}
    for name, loop in ARMS.items():
        run_dir = Path(tempfile.mkdtemp(prefix=f"bench-long-tail-{name}-"))
        os.environ[SAMPLER_LOOP_ENV] = loop
        try:
            info = run_train(
                str(CONFIG),
                model,
                run_dir / "run",
                [*overrides, f"trainer.total_steps={steps}", "pipeline.max_staleness=1"],
            )
        finally:
            del os.environ[SAMPLER_LOOP_ENV]
        records = [r for r in read_records(run_dir / "run") if "time/step" in r]
        times = [r["time/step"] for r in records[2:]]
        out[name] = {
            "step_s_median": statistics.median(times),
            "steps": len(records),
            "max_lag": max(r.get("staleness/max", 0) for r in records),
            "stale_drops": sum(r.get("dropped/stale_groups", 0) for r in records),
            "run_s": info["run_s"],
            "run_dir": str(run_dir / "run"),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (2 segments of 48 prompts, 6 RL steps)")
    parser.add_argument("--model", default=None, help="HF model dir (default: the shipped builtin:tiny-long)")
    parser.add_argument("--segments", type=int, default=8, help="prompt sets per arm (alternating A B B A ...)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per segment (from builtin:sums/train)")
    parser.add_argument("--warmup", type=int, default=16, help="untimed prompts per arm before the segments")
    parser.add_argument("--steps", type=int, default=14, help="RL steps per arm at k = 1 (0: skip part 2)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for both arms, e.g. model.engine_dtype=auto or rollout.enforce_eager=false",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.segments, args.prompts, args.warmup, args.steps = 2, 48, 8, 6
    if args.warmup + args.segments * args.prompts > 20000:
        raise SystemExit("--warmup + --segments x --prompts is over 20000: the train split has 20000 prompts")
    for name, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
        os.environ.setdefault(name, value)
    if args.model is None:
        from speed_async.tiny.store import shipped_model_dir

        args.model = str(shipped_model_dir("builtin:tiny-long"))
    load_before = os.getloadavg()
    sampler = sampler_part(args.model, args.segments, args.prompts, args.warmup, args.set)
    rl = rl_part(args.model, args.steps, args.set) if args.steps else {}
    ratio = sampler["continuous"]["tokens_per_s"] / sampler["batched"]["tokens_per_s"]
    cpu_ratio = sampler["continuous"]["tokens_per_cpu_s"] / sampler["batched"]["tokens_per_cpu_s"]
    print(f"\nlong tail: builtin:sums, {args.segments} segment(s) x {args.prompts} prompts per arm, alternating")
    rows = []
    for name in ARMS:
        s = sampler[name]
        rows.append([
            name, s["tokens"], s["seconds"], s["tokens_per_s"], s["tokens_per_cpu_s"], s["occupancy"], s["engine_busy"],
            s["groups"],
            s["screen_to_group_median_s"], s["screen_to_group_p90_s"], rl.get(name, {}).get("step_s_median", "-"),
        ])  # fmt: skip
    print_table(
        ["arm", "tokens", "seconds", "tokens/s", "tokens/CPU-s", "occupancy", "engine busy", "groups",
         "screen->group med s",
         "p90 s", "RL step s (k=1)"], rows,
    )  # fmt: skip
    print("\nengine occupancy over a segment (tenths of its duration, mean over segments):")
    print_table(["arm", *[f"{i}/10" for i in range(1, BINS + 1)]], [[n, *sampler[n]["occupancy_bins"]] for n in ARMS])
    print(f"continuous / batched: tokens/s {ratio:.3f}, tokens per sampler CPU-second {cpu_ratio:.3f}")
    emit(
        {
            "benchmark": "long_tail",
            "continuous_over_batched": ratio,
            "continuous_over_batched_cpu": cpu_ratio,
            "sampler": sampler,
            "rl": rl,
            "args": vars(args),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
