"""Sampler throughput: the bare vLLM engine vs the full sampler pipeline on the same prompts, interleaved in one run.

The pipeline adds what a sampler does beyond generation: SPEED bookkeeping, decoding, Math-Verify scoring in
worker processes, msgpack encoding and the ZeroMQ send. Both arms generate `--n` samples for the same
`--prompts` held-out arithmetic prompts, `--rounds` times per slice (plain groups, no screening, so the token
counts are comparable): the bare engine in one `generate` call per slice (the engine full until the one tail at
its end, its best case), the pipeline fed round by round as it asks for work (drained once per slice, at its
end). Each arm is one long-lived process with the engine pinned as `speed-async train` pins a sampler's (one
thread on `--engine-cores`, default the last core); the pipeline's reward host and workers run on the other cores,
as the launcher's CPU plan puts them, and this process plays the dispatcher there. Both arms run eager
(`--compile`: both with torch.compile, as the shipped configs' samplers run) with float32 weights (`--dtype
bfloat16`: both in bfloat16).

The arms take turns, slice by slice, `--repeats` pairs in rotating order (bare first, then pipeline first, ...),
so a drift of the machine hits both alike (this host's speed moves by 10% over minutes); the arm not running is
stopped with SIGSTOP (an idle engine's process still has threads that wake). All that `--restarts` times with
fresh processes: two processes of the same arm and settings can differ by a few % for their whole life here
(0.922 vs 0.949 of the bare engine for two identical samplers in one run; the cause is not established, memory
layout is the usual suspect), so one start per arm would carry that into every pair. `--also KEY=VALUE,...` adds
a pipeline with other sampler settings as a third arm of the same run (each arm then takes each place in the
order as often). `--stream` adds the streaming limit (`benchmarks/stream_arm.py`): an engine process that only
submits whole prompts as slots free, steps and sends the finished samples back, nothing of the sampler's own
work; `stream_over_bare` is the price of streaming itself, `pipeline_over_stream` the price of the sampler's
work. Every engine arm runs with a sampler's CPU huge pages (`enable_cpu_huge_pages`). Prints a table, then one
JSON line with `pipeline_over_bare`, the median of the pairs' ratios.

    python benchmarks/sampler_throughput.py [--quick] [--compile] [--dtype bfloat16] [--stream] [--also KEY=VALUE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine, print_table
from benchmarks.stream_arm import StreamArm, stream_server

SLICE_TIMEOUT_S = 600.0
"""Longest a slice may take in either arm before the benchmark gives up (naming the arm)."""


def _prompts(model: str, count: int) -> tuple[list[np.ndarray], list[str]]:
    from transformers import AutoTokenizer

    from speed_async.data.arithmetic import load_split
    from speed_async.data.templates import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    records = load_split("test")[:count]
    return [np.array(tokenizer.encode(render_prompt(r)), np.int32) for r in records], [r.ground_truth for r in records]


def bare_server(
    model: str, count: int, n: int, max_tokens: int, rounds: int, eager: bool, dtype: str, helper_cpus: set[int]
) -> None:
    """The bare arm's process: one engine; each "run" line on stdin generates one slice and prints its JSON."""
    from speed_async.sampler.engine import Engine, SamplingSettings, enable_cpu_huge_pages

    enable_cpu_huge_pages()  # as a sampler on CPU does (launcher.roles.run_sampler)
    prompts, _ = _prompts(model, count)
    # Its process groups' threads go where a sampler's go, off the engine's cores: the same engine in both arms.
    engine = Engine(model, dtype=dtype, max_model_len=256, enforce_eager=eager, helper_cpus=helper_cpus)
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=None)
    engine.generate(prompts, [n] * len(prompts), settings)  # warm-up: one round, as the pipeline's
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        out = engine.generate(prompts * rounds, [n] * (len(prompts) * rounds), settings)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for comps in out for c in comps)
        print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}), flush=True)
    engine.close()


def _arm_argv(args: argparse.Namespace, arm: str) -> list[str]:
    """The command line of an engine arm's own process (started pinned to the engine's cores)."""
    argv = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--prompts", str(args.prompts),
            "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds),
            "--engine-cores", args.engine_cores, "--dtype", args.dtype]  # fmt: skip
    return argv + (["--compile"] if args.compile else [])


class BareArm:
    """The bare engine in its own process (started pinned to the engine's cores)."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        argv = _arm_argv(args, "bare")
        self.log = tempfile.NamedTemporaryFile(prefix="bench-bare-", suffix=".log", delete=False)  # noqa: SIM115
        from speed_async.lifetime import preexec_die_with_parent

        # Killed with this process even while stopped (SIGKILL reaches a stopped process; a closed stdin would not).
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, preexec_fn=preexec_die_with_parent())  # fmt: skip
        self._read()  # ready
        os.kill(self.proc.pid, signal.SIGSTOP)  # as the sampler between its slices: not one thread wakes

    def _read(self) -> dict[str, float]:
        """The process's next JSON line (vLLM logs to stdout as well: those lines are skipped)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the bare engine's process exited (code {self.proc.wait()}); see {self.log.name}")

    def run(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        try:
            return self._read()
        finally:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def close(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PipelineArm:
    """A real sampler process fed by this process acting as the dispatcher; tokens counted on arrival."""

    def __init__(self, args: argparse.Namespace, reward_cores: str, overrides: list[str]) -> None:
        from launcher.standalone import start_sampler
        from speed_async.config import load_config
        from speed_async.protocol import WorkItem
        from speed_async.transport import Context, PullSocket, RouterSocket

        prompts, answers = _prompts(args.model, args.prompts)
        config = load_config(
            None,
            [
                "curriculum.mode=none", f"rollout.n={args.n}", f"rollout.gen_batch_size={args.prompts}",
                f"rollout.max_response_length={args.max_tokens}",
                f"rollout.enforce_eager={str(not args.compile).lower()}", "data.max_prompt_length=192",
                "pipeline.reward_workers=1", f"model.engine_dtype={args.dtype}", *overrides,
            ],
        )  # fmt: skip
        self.ctx = Context()
        self.router, self.pull = RouterSocket(self.ctx), PullSocket(self.ctx)
        endpoints = {
            "work": self.router.bind_endpoint("127.0.0.1", 0),
            "results": self.pull.bind_endpoint("127.0.0.1", 0),
        }
        self.run_dir = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
        self.proc = start_sampler(config, self.run_dir, Path(args.model), 0, endpoints, cpus=args.engine_cores,
                                  reward_cpus=reward_cores)  # fmt: skip
        self.items = [
            WorkItem(prompt_id=i, epoch=0, data_source="arithmetic", prompt_token_ids=p, ground_truth=a,
                     num_screen=args.n, num_continue=0)
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        ]  # fmt: skip
        self.epoch = 0  # a new epoch per round handed out, so that no two rounds share a prompt key
        self.identity = b""
        self._slice(1)  # warm-up: the engine compiles, the reward workers start
        self.pause()

    def _slice(self, rounds: int) -> dict[str, float]:
        """Hand out `rounds` rounds, each as soon as the sampler asks for work; wait for every group."""
        from speed_async.protocol import NoWork, RolloutGroup, WorkAssignment, WorkItem, WorkRequest

        count = len(self.items)
        handed, received, tokens = 0, 0, 0
        start, deadline = None, time.monotonic() + SLICE_TIMEOUT_S
        while received < rounds * count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                code = self.proc.poll()
                raise RuntimeError(f"the sampler did not finish a slice (exit code {code}); see {self.run_dir}")
            got = self.router.recv(0.005)
            if got is not None:
                self.identity, msg = got
                if isinstance(msg, WorkRequest) and handed < rounds:
                    self.epoch += 1
                    fields = [f for f in WorkItem.__dataclass_fields__ if f != "epoch"]
                    work = [WorkItem(**{f: getattr(it, f) for f in fields}, epoch=self.epoch) for it in self.items]
                    self.router.send_to(self.identity, WorkAssignment(items=work, version=0))
                    start = time.perf_counter() if start is None else start
                    handed += 1
                elif isinstance(msg, WorkRequest):
                    self.router.send_to(self.identity, NoWork(retry_after_s=0.01, reason="bench"))
            msg = self.pull.recv(0.0 if got is not None else 0.005)
            while msg is not None:  # groups, and the heartbeats and stats that the benchmark ignores
                if isinstance(msg, RolloutGroup):
                    received += 1
                    tokens += int(msg.response_lengths.sum())
                msg = self.pull.recv(0.0)
        seconds = time.perf_counter() - (start or time.perf_counter())
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    def run(self, rounds: int) -> dict[str, float]:
        self.resume()
        try:
            return self._slice(rounds)
        finally:
            self.pause()

    def pause(self) -> None:
        """Stop the sampler, its reward host and workers (one process group) while the other arm runs."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        from launcher.standalone import kill_group
        from speed_async.protocol import Shutdown

        self.resume()
        if self.identity:
            self.router.send_to(self.identity, Shutdown(reason="bench done"))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        kill_group(self.proc)
        self.router.close()
        self.pull.close()
        self.ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (1-2 minutes on 2 cores)")
    parser.add_argument("--model", default=None, help="HF model dir (default: the embedded tiny model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="rounds per slice")
    parser.add_argument("--repeats", type=int, default=2, help="slice pairs per start of the arms' processes")
    parser.add_argument("--restarts", type=int, default=4, help="starts of fresh processes for both arms")
    parser.add_argument("--engine-cores", default=None, help="cores of the engine (default: the last core)")
    parser.add_argument(
        "--compile", action="store_true", help="both arms with torch.compile (rollout.enforce_eager = false, as the "
        "shipped configs run) instead of eager",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both arms' weights")
    parser.add_argument("--also", default=None, help="a third arm: the pipeline with these KEY=VALUE,... settings")
    parser.add_argument(
        "--stream", action="store_true", help="a third arm: an engine that only streams (benchmarks/stream_arm.py)"
    )
    parser.add_argument("--arm", choices=["bare", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--fds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.rounds, args.repeats, args.restarts = 32, 4, 2, 1
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if args.model is None:
        from speed_async.tiny import ensure_tiny_model

        args.model = str(ensure_tiny_model())
    cores = sorted(os.sched_getaffinity(0))
    args.engine_cores = args.engine_cores or str(cores[-1])
    engine = {int(c) for c in args.engine_cores.split(",")}
    reward_cores = ",".join(str(c) for c in cores if c not in engine) or args.engine_cores
    if args.arm:  # an engine arm's process: pinned before torch starts its threads
        os.sched_setaffinity(0, engine)
        helpers = {int(c) for c in reward_cores.split(",")} - engine
        if args.arm == "stream":
            stream_server(args.fds, args.model, args.max_tokens, not args.compile, args.dtype, helpers)
        else:
            bare_server(args.model, args.prompts, args.n, args.max_tokens, args.rounds, not args.compile, args.dtype,
                        helpers)  # fmt: skip
        return
    where = machine()  # before this process leaves the engine's cores
    # This process plays the dispatcher, which runs in the learner, off the engine's core.
    os.sched_setaffinity(0, {int(c) for c in reward_cores.split(",")})
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": args.engine_cores}
    also = [kv for kv in (args.also or "").split(",") if kv]
    also_name = f"pipeline[{','.join(also)}]"
    names = ["bare", "pipeline", *(["stream"] if args.stream else []), *([also_name] if also else [])]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    prompts = _prompts(args.model, args.prompts)[0] if args.stream else []
    for restart in range(args.restarts):  # fresh processes: each keeps its own speed, a few % either way
        arms: dict[str, BareArm | PipelineArm | StreamArm] = {}
        try:
            arms["bare"] = BareArm(args, env)
            arms["pipeline"] = PipelineArm(args, reward_cores, [])
            if args.stream:
                arms["stream"] = StreamArm(_arm_argv(args, "stream"), env, prompts, args.n)
            if also:
                arms[also_name] = PipelineArm(args, reward_cores, also)
            for i in range(args.repeats):  # rotating order: each arm runs first (of 3: each place) as often
                k = (restart * args.repeats + i) % len(names)
                for name in names[k:] + names[:k]:
                    arm = arms[name]
                    runs[name].append(arm.run() if isinstance(arm, BareArm) else arm.run(args.rounds))
        finally:
            for arm in arms.values():
                arm.close()
    pairs = args.restarts * args.repeats
    ratios = {
        name: [p["tokens_per_s"] / b["tokens_per_s"] for b, p in zip(runs["bare"], rs, strict=True)]
        for name, rs in runs.items()
        if name != "bare"
    }
    print(
        f"sampler throughput: {args.prompts} prompts x n={args.n}, <= {args.max_tokens} tokens, {args.rounds} rounds "
        f"per slice, {args.restarts} starts x {args.repeats} pairs interleaved, engine on core(s) {args.engine_cores}, "
        f"reward workers on {reward_cores}, {'torch.compile' if args.compile else 'eager'}, {args.dtype}"
    )
    print_table(
        ["pair", "arm", "tokens", "seconds", "tokens/s", "over bare"],
        [
            [i, name, r["tokens"], r["seconds"], r["tokens_per_s"], ratios[name][i] if name in ratios else 1.0]
            for i in range(pairs)
            for name, rs in runs.items()
            for r in rs[i : i + 1]
        ],
    )
    for name, rs in ratios.items():
        print(f"{name} / bare per pair: {', '.join(f'{r:.3f}' for r in rs)}; median {statistics.median(rs):.3f}")
    result = {
        "benchmark": "sampler_throughput",
        "pipeline_over_bare": statistics.median(ratios["pipeline"]),
        "pipeline_over_bare_each": ratios["pipeline"],
        **{f"{name}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()},
        "args": vars(args),
        "machine": where,
    }
    if args.stream:
        result["stream_over_bare"] = statistics.median(ratios["stream"])
        result["stream_over_bare_each"] = ratios["stream"]
        each = [p / s for p, s in zip(ratios["pipeline"], ratios["stream"], strict=True)]
        result["pipeline_over_stream"] = statistics.median(each)
        listed = ", ".join(f"{r:.3f}" for r in each)
        print(f"pipeline / stream per slice: {listed}; median {statistics.median(each):.3f}")
    if also:
        result["also_over_bare"] = statistics.median(ratios[also_name])
        result["also_over_bare_each"] = ratios[also_name]
    emit(result)


if __name__ == "__main__":
    main()
