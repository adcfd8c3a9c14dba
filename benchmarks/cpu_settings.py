"""CPU settings chosen by measurement: the engine's throughput by batch width (torch.compile against eager, float32
against bfloat16 weights), and the learner's RL-step time by micro-batch token budget (and in bfloat16 at the
best budget), on one core each (as `speed-async train` pins them).

Engine arm (one process per compile and dtype setting, pinned to the last core): the vLLM engine of the sampler
(`speed_async.sampler.engine.Engine`, streaming API) keeps exactly `width` requests in flight (a finished one is
replaced at once by a new one) for `--seconds` per width: tokens/s and milliseconds per engine step. This is what
the continuous sampler does; its mean occupancy in a run is in `run_dir/sampler-<i>.json`
(`sequence_steps / engine_steps`).

Learner arm (one process per budget, pinned to the first core, one thread): `Learner.train_step` of the FSDP2
learner (gloo, one rank) on 16 groups x 16 responses of the embedded task's prompts with responses of 32 +- 10
tokens (the lengths `make run` trains on), after 2 warm-up steps: seconds per RL step, forward and backward.

    python benchmarks/cpu_settings.py [--quick] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine, print_table  # noqa: E402

WIDTHS = (16, 32, 64, 128, 256)
BUDGETS = (8192, 4096, 2048, 1024)
ENGINE_ARMS = ("eager/float32", "compile/float32", "eager/bfloat16", "compile/bfloat16")


def _prompts(model: str, count: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    from speed_async.data.arithmetic import load_split
    from speed_async.data.templates import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [np.array(tokenizer.encode(render_prompt(r)), np.int32) for r in load_split("test")[:count]]


def engine_arm(model: str, eager: bool, dtype: str, widths: list[int], seconds: float) -> list[dict[str, float]]:
    """Tokens/s and ms per engine step with exactly `width` requests in flight, for each width."""
    from speed_async.sampler.engine import Engine, SamplingSettings

    prompts = _prompts(model, 256)
    started = time.perf_counter()
    engine = Engine(model, dtype=dtype, max_model_len=192, enforce_eager=eager, max_num_seqs=max(widths))
    start_s = time.perf_counter() - started
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=64, seed=None)
    engine.generate(prompts[:8], [4] * 8, settings)  # warm-up
    rows, serial = [], 0
    for width in widths:
        live = []
        for _ in range(width):
            live.append(f"r{serial}")
            engine.submit(live[-1], prompts[serial % len(prompts)], settings)
            serial += 1
        tokens, steps, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            steps += 1
            for _, completion in engine.step():
                tokens += len(completion.token_ids)
                live.append(f"r{serial}")
                engine.submit(live[-1], prompts[serial % len(prompts)], settings)
                serial += 1
        elapsed = time.perf_counter() - t0
        engine.abort(live)
        rows.append({"width": width, "tokens_per_s": tokens / elapsed, "ms_per_step": 1000 * elapsed / steps})
    engine.close()
    return [{**r, "start_s": start_s} for r in rows]


def learner_arm(model: str, budget: int, dtype: str, repeats: int) -> dict[str, float]:
    """Seconds of one RL step (and its forward / backward) with micro-batches of `budget` tokens, computing in
    `dtype` (FSDP2 mixed precision for bfloat16, as `model.train_dtype`)."""
    import torch

    from speed_async.config import load_config
    from speed_async.curriculum.train_group import TrainGroup
    from speed_async.learner.train_step import Learner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + budget % 97), RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    overrides = [f"algorithm.micro_batch_tokens={budget}", f"model.train_dtype={dtype}"]
    config = load_config(ROOT / "configs" / "tiny-cpu.toml", overrides)
    prompts = _prompts(model, 16)
    rng = np.random.default_rng(0)

    def groups() -> list[TrainGroup]:
        out = []
        for g, prompt in enumerate(prompts):
            lengths = np.clip(rng.normal(32, 10, 16).astype(int), 4, 64)
            responses = [rng.integers(1, 300, n).astype(np.int32) for n in lengths]
            out.append(
                TrainGroup(
                    prompt_id=g, epoch=0, data_source="arithmetic", prompt_token_ids=prompt, responses=responses,
                    behaviour_logprobs=[np.full(len(r), -1.0, np.float32) for r in responses],
                    rewards=rng.integers(0, 2, 16).astype(np.float32), version=0,
                )
            )  # fmt: skip
        return out

    learner = Learner(config, model, "cpu")
    for step in range(2):
        learner.train_step(groups(), step)
    stats = [learner.train_step(groups(), 2 + i) for i in range(repeats)]
    return {
        "budget": budget,
        "dtype": dtype,
        **{k: float(np.mean([s[f"seconds_{k}"] for s in stats])) for k in ("step", "forward", "backward")},
    }


def _child(argv: list[str], core: int) -> dict | list:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core), "OMP_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", str(core), sys.executable, __file__, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer widths and budgets, shorter windows")
    parser.add_argument("--model", default=None, help="HF model dir (default: the embedded tiny model)")
    parser.add_argument("--seconds", type=float, default=4.0, help="engine: seconds per width")
    parser.add_argument("--repeats", type=int, default=3, help="learner: timed RL steps per budget")
    parser.add_argument("--out", type=Path, help="write a results markdown file here")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_CPU_KVCACHE_SPACE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if args.model is None:
        from speed_async.tiny import ensure_tiny_model

        args.model = str(ensure_tiny_model())
    widths, budgets = (list(WIDTHS[1:4]), list(BUDGETS[:3])) if args.quick else (list(WIDTHS), list(BUDGETS))
    if args.quick:
        args.seconds, args.repeats = 2.0, 2
    if args.arm:  # child process: one arm, one JSON line
        kind, value, dtype = args.arm.split(":")
        if kind == "engine":
            print(json.dumps(engine_arm(args.model, value == "eager", dtype, widths, args.seconds)))
        else:
            print(json.dumps(learner_arm(args.model, int(value), dtype, args.repeats)))
        return
    cores = sorted(os.sched_getaffinity(0))
    common = ["--model", args.model, "--seconds", str(args.seconds), "--repeats", str(args.repeats)]
    common += ["--quick"] if args.quick else []
    engine = {arm: _child([*common, "--arm", f"engine:{arm.replace('/', ':')}"], cores[-1]) for arm in ENGINE_ARMS}
    learner = [_child([*common, "--arm", f"learner:{b}:float32"], cores[0]) for b in budgets]
    best_budget = min(learner, key=lambda r: r["step"])
    learner.append(_child([*common, "--arm", f"learner:{best_budget['budget']}:bfloat16"], cores[0]))
    engine_rows = [
        [rows[0]["width"], *(f"{r['tokens_per_s']:.0f} ({r['ms_per_step']:.2f})" for r in rows)]
        for rows in zip(*engine.values(), strict=True)
    ]
    engine_headers = ["width", *(f"{arm} tok/s (ms/step)" for arm in engine)]
    print_table(engine_headers, engine_rows)
    learner_rows = [
        [r["budget"], r["dtype"], f"{r['step']:.3f}", f"{r['forward']:.3f}", f"{r['backward']:.3f}"] for r in learner
    ]
    learner_headers = ["micro_batch_tokens", "dtype", "s/step", "forward s", "backward s"]
    print_table(learner_headers, learner_rows)

    def best(arm: str) -> float:
        return max(r["tokens_per_s"] for r in engine[arm])

    result = {
        "benchmark": "cpu_settings",
        "engine": engine,
        "engine_start_s": {m: rows[0]["start_s"] for m, rows in engine.items()},
        "compile_over_eager_best": {
            dtype: best(f"compile/{dtype}") / best(f"eager/{dtype}") for dtype in ("float32", "bfloat16")
        },
        "bfloat16_over_float32_best": max(best("eager/bfloat16"), best("compile/bfloat16"))
        / max(best("eager/float32"), best("compile/float32")),
        "learner": learner,
        "best_micro_batch_tokens": best_budget["budget"],
        "learner_bfloat16_over_float32": learner[-1]["step"] / best_budget["step"],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
    }
    if args.out:
        _write(args.out, engine_headers, engine_rows, learner_headers, learner_rows, result)
    emit(result)


def _write(path: Path, eh: list[str], er: list, lh: list[str], lr: list, result: dict) -> None:
    def table(h: list[str], r: list) -> str:
        lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in r])

    text = (
        "# CPU settings (benchmarks/cpu_settings.py)\n\n"
        f"Command: `python benchmarks/cpu_settings.py {' '.join(sys.argv[1:])}`\n\n"
        f"## Engine: one core, `width` requests in flight (arm = compile mode / weights dtype)\n\n{table(eh, er)}\n\n"
        "## Learner: one core, one RL step of 16 x 16 responses (bfloat16: at the best float32 budget)\n\n"
        f"{table(lh, lr)}\n\n"
        f"## JSON\n\n```\n{json.dumps(result, sort_keys=True)}\n```\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
