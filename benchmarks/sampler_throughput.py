"""Sampler throughput: the bare vLLM engine vs the full sampler pipeline on the same prompts.

The pipeline adds what a sampler does beyond generation: SPEED bookkeeping, decoding, Math-Verify scoring in
worker processes, msgpack encoding and the ZeroMQ send. Both arms generate `--n` samples for the same
`--prompts` held-out arithmetic prompts `--rounds` times (plain groups, no screening, so the token counts are
comparable): the bare engine in one `generate` call, the pipeline fed as it asks for work (one drain at the end each),
each in its own fresh process, with the engine pinned as `speed-async train` pins a sampler's (one thread on
`--engine-cores`, default the last core) and, in the pipeline, its reward workers on the other cores (as the
launcher's CPU plan puts them). Both arms run eager (`--compile`: both with torch.compile, as the shipped
configs' samplers run) with float32 weights (`--dtype bfloat16`: both in bfloat16). `--repeats` pairs,
alternating; prints a table, then one JSON line with `pipeline_over_bare`, the median of the pairs' ratios.

    python benchmarks/sampler_throughput.py [--quick] [--compile] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine, print_table


def _prompts(model: str, count: int) -> tuple[list[np.ndarray], list[str]]:
    from transformers import AutoTokenizer

    from speed_async.data.arithmetic import load_split
    from speed_async.data.templates import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    records = load_split("test")[:count]
    return [np.array(tokenizer.encode(render_prompt(r)), np.int32) for r in records], [r.ground_truth for r in records]


def bare(model: str, count: int, n: int, max_tokens: int, rounds: int, eager: bool, dtype: str) -> dict[str, float]:
    """Generation only, in this process."""
    from speed_async.sampler.engine import Engine, SamplingSettings

    prompts, _ = _prompts(model, count)
    engine = Engine(model, dtype=dtype, max_model_len=256, enforce_eager=eager)
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=None)
    engine.generate(prompts[:4], [n] * 4, settings)  # warm-up
    # Every round's prompts in one call: the engine stays full until the one tail at the end, its best case.
    start = time.perf_counter()
    out = engine.generate(prompts * rounds, [n] * (len(prompts) * rounds), settings)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for comps in out for c in comps)
    engine.close()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def pipeline(
    model: str, count: int, n: int, max_tokens: int, rounds: int, cores: str, reward_cores: str, eager: bool, dtype: str
) -> dict[str, float]:
    """A real sampler process fed by this process acting as the dispatcher; tokens counted on arrival."""
    from launcher.standalone import kill_group, start_sampler
    from speed_async.config import load_config
    from speed_async.protocol import NoWork, RolloutGroup, Shutdown, WorkAssignment, WorkItem, WorkRequest
    from speed_async.transport import Context, PullSocket, RouterSocket

    prompts, answers = _prompts(model, count)
    config = load_config(
        None,
        [
            "curriculum.mode=none", f"rollout.n={n}", f"rollout.gen_batch_size={count}",
            f"rollout.max_response_length={max_tokens}", f"rollout.enforce_eager={str(eager).lower()}",
            "data.max_prompt_length=192", "pipeline.reward_workers=1", f"model.engine_dtype={dtype}",
        ],
    )  # fmt: skip
    ctx = Context()
    router, pull = RouterSocket(ctx), PullSocket(ctx)
    endpoints = {"work": router.bind_endpoint("127.0.0.1", 0), "results": pull.bind_endpoint("127.0.0.1", 0)}
    run_dir = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
    proc = start_sampler(config, run_dir, Path(model), 0, endpoints, cpus=cores, reward_cpus=reward_cores)
    items = [
        WorkItem(prompt_id=i, epoch=0, data_source="arithmetic", prompt_token_ids=p, ground_truth=a,
                 num_screen=n, num_continue=0)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]  # fmt: skip
    # Round 0 is the warm-up (engine and reward workers start), handed alone. Rounds 1..rounds are timed from the
    # moment the warm-up's last group arrives, and each is handed as soon as the sampler asks for work (as a
    # dispatcher would), so the engine is fed across round boundaries and drains once, at the end, like the
    # bare engine's one call.
    handed, received, tokens, start = 0, 0, 0, None
    identity = b""
    try:
        while received < (rounds + 1) * count:
            got = router.recv(0.01)
            if got is not None:
                identity, msg = got
                if isinstance(msg, WorkRequest):
                    if handed == 0 or (1 <= handed <= rounds and received >= count):
                        epoch_items = [
                            WorkItem(**{**{f: getattr(it, f) for f in it.__dataclass_fields__}, "epoch": handed})
                            for it in items
                        ]
                        router.send_to(identity, WorkAssignment(items=epoch_items, version=0))
                        handed += 1
                    else:
                        router.send_to(identity, NoWork(retry_after_s=0.01, reason="bench"))
            msg = pull.recv(0.01)
            if isinstance(msg, RolloutGroup):
                received += 1
                if received == count:
                    start = time.perf_counter()
                elif received > count:
                    tokens += int(msg.response_lengths.sum())
        seconds = time.perf_counter() - start
        router.send_to(identity, Shutdown(reason="bench done"))
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
        router.close()
        pull.close()
        ctx.close()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (under 3 minutes on 2 cores)")
    parser.add_argument("--model", default=None, help="HF model dir (default: the embedded tiny model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="bare / pipeline pairs; the median ratio is reported")
    parser.add_argument("--engine-cores", default=None, help="cores of the engine (default: the last core)")
    parser.add_argument(
        "--compile", action="store_true", help="both arms with torch.compile (rollout.enforce_eager = false, as the "
        "shipped configs run) instead of eager",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both arms' weights")
    parser.add_argument("--arm", choices=["bare", "pipeline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.rounds, args.repeats = 32, 2, 1
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
    if args.arm == "bare":  # child process: one arm, one JSON line
        os.sched_setaffinity(0, engine)
        print(json.dumps(bare(args.model, args.prompts, args.n, args.max_tokens, args.rounds, not args.compile,
                                args.dtype)))  # fmt: skip
        return
    if args.arm == "pipeline":  # this process plays the dispatcher, which runs in the learner, off the engine's core
        os.sched_setaffinity(0, {int(c) for c in reward_cores.split(",")})
        print(json.dumps(pipeline(args.model, args.prompts, args.n, args.max_tokens, args.rounds, args.engine_cores,
                                  reward_cores, not args.compile, args.dtype)))  # fmt: skip
        return
    import statistics
    import subprocess

    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": args.engine_cores}
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "pipeline": []}
    for _ in range(args.repeats):  # the arms alternate, so a drift of the machine hits both alike
        for arm in runs:
            argv = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--prompts", str(args.prompts),
                    "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds),
                    "--engine-cores", args.engine_cores, "--dtype", args.dtype]  # fmt: skip
            argv += ["--compile"] if args.compile else []
            out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=1200, env=env)
            runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [p["tokens_per_s"] / b["tokens_per_s"] for b, p in zip(runs["bare"], runs["pipeline"], strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"sampler throughput: {args.prompts} prompts x n={args.n}, <= {args.max_tokens} tokens, {args.rounds} rounds, "
        f"{args.repeats} repeats, engine on core(s) {args.engine_cores}, reward workers on {reward_cores}, "
        f"{'torch.compile' if args.compile else 'eager'}, {args.dtype}"
    )
    print_table(
        ["repeat", "arm", "tokens", "seconds", "tokens/s"],
        [[i, arm, r["tokens"], r["seconds"], r["tokens_per_s"]] for arm, rs in runs.items() for i, r in enumerate(rs)],
    )
    print(f"pipeline / bare per repeat: {', '.join(f'{r:.3f}' for r in ratios)}; median {ratio:.3f}")
    emit(
        {
            "benchmark": "sampler_throughput",
            "pipeline_over_bare": ratio,
            "pipeline_over_bare_each": ratios,
            **{f"{a}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs) for a, rs in runs.items()},
            "args": vars(args),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
