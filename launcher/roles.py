"""Role entry points, one per process: `python -m launcher.roles learner|sampler --run-dir DIR ...`, and the
command lines the single-machine launcher starts them with (`role_commands`).

The learner role runs under torchrun (every rank); samplers are plain processes. Both read the run's
resolved config, so every process of a run uses the same settings. Started by the launcher, a role first ties
its life to it (speed_async.lifetime.die_with_the_run): it dies when its parent does (the launcher, or for a
learner rank its torchrun agent, whose parent must be the launcher), and its process group goes with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from speed_async.config import Config, config_from_dict
from speed_async.lifetime import die_with_the_run
from speed_async.rundir import read_json, write_json

ENDPOINTS_FILE = "endpoints.json"
EXIT_LEARNER_UNRESPONSIVE = 3
"""Exit status of a sampler that found the learner unresponsive: the launcher stops the run instead of
restarting the sampler."""


@dataclass(frozen=True)
class CpuPlan:
    """Which cores each role of a single-machine CPU run may use (comma-separated core lists)."""

    learner: str
    samplers: list[str]
    """One list per sampler; its vLLM engine binds one thread to each of them."""
    rewards: str
    """The samplers' reward worker processes (scoring runs beside generation, on whatever core is free)."""


def cpu_plan(config: Config) -> CpuPlan:
    """Cores of every role on a CPU machine. With a core for each, the learner ranks take the first ones and the
    samplers share out the rest (like dedicated GPUs); with fewer cores than roles, each sampler still gets a
    core of its own (round robin) and the learner runs on all of them, time-sharing with the samplers. Reward
    workers may run on every core: they score while the engine generates, so they take what is idle (on a
    2-core machine mostly the learner's core while it waits for a batch)."""
    cores = sorted(os.sched_getaffinity(0))
    every = ",".join(map(str, cores))
    learners, samplers = config.cluster.num_learner_ranks, config.cluster.num_samplers
    if len(cores) < learners + samplers:
        return CpuPlan(every, [str(cores[i % len(cores)]) for i in range(samplers)], every)
    per_sampler = max(1, (len(cores) - learners) // samplers)
    rest = cores[learners:]
    sampler_cores = [",".join(map(str, rest[i * per_sampler : (i + 1) * per_sampler])) for i in range(samplers)]
    return CpuPlan(",".join(map(str, cores[:learners])), sampler_cores, every)


def role_commands(
    config: Config, run_dir: Path, model: str, resume: bool = False
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(role, argv, extra env) of every process of a single-machine run (`resume`: the learner continues
    from the run's newest checkpoint)."""
    on_cpu = config.cluster.device == "cpu" or (config.cluster.device == "auto" and not _has_cuda())
    plan = cpu_plan(config) if on_cpu else CpuPlan("", [""] * config.cluster.num_samplers, "")
    py = sys.executable
    learner = [
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.cluster.num_learner_ranks}",
        "-m", "launcher.roles", "learner", "--run-dir", str(run_dir), "--model", model,
    ]  # fmt: skip
    if plan.learner:
        learner += ["--cpus", plan.learner]
    if resume:
        learner.append("--resume")
    cmds: list[tuple[str, list[str], dict[str, str]]] = [("learner", learner, {"OMP_NUM_THREADS": "1"})]
    for i in range(config.cluster.num_samplers):
        argv = [py, "-m", "launcher.roles", "sampler", "--run-dir", str(run_dir), "--model", model]
        argv += ["--sampler-id", str(i)]
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if plan.samplers[i]:
            argv += ["--cpus", plan.samplers[i], "--reward-cpus", plan.rewards]
            env["VLLM_CPU_OMP_THREADS_BIND"] = plan.samplers[i]
        cmds.append((f"sampler[{i}]", argv, env))
    return cmds


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _config(run_dir: Path) -> Config:
    path = run_dir / "resolved_config.json"
    return config_from_dict(read_json(path, "the launcher writes it before starting any role"), origin=str(path))


def wait_for_endpoints(run_dir: Path, timeout_s: float) -> dict:
    """The learner's socket endpoints, written (atomically) by learner rank 0 once it has bound them."""
    path = run_dir / ENDPOINTS_FILE
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the learner did not publish its endpoints ({path}) within {timeout_s:.0f} s")
        time.sleep(0.1)
    found = read_json(path, "learner rank 0 writes it; was it written by something else?")
    if not isinstance(found, dict):
        raise ValueError(f"{path} is not a JSON object of endpoints; learner rank 0 writes it")
    return found


def _cores(cores: str | None) -> set[int] | None:
    return {int(c) for c in cores.split(",")} if cores else None


def _pin_cpus(cores: str | None) -> None:
    if cores:
        os.sched_setaffinity(0, _cores(cores))


def main(argv: list[str] | None = None) -> int:
    """Parse the role's command line and run it."""
    die_with_the_run()
    parser = argparse.ArgumentParser(prog="launcher.roles")
    parser.add_argument("role", choices=["learner", "sampler"])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--sampler-id", type=int, default=0)
    parser.add_argument("--cpus", default=None, help="comma-separated CPU cores to pin this process to")
    parser.add_argument("--reward-cpus", default=None, help="sampler: cores its reward worker processes may use")
    parser.add_argument("--resume", action="store_true", help="learner: continue from the newest checkpoint")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    role = f"learner[{rank}]" if args.role == "learner" else f"sampler[{args.sampler_id}]"
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {role} %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )
    _pin_cpus(args.cpus)
    config = _config(args.run_dir)
    if args.role == "learner":
        import torch

        if args.cpus:
            torch.set_num_threads(len(args.cpus.split(",")))
        from speed_async.learner.main import run_learner

        return run_learner(config, args.run_dir, args.model, resume=args.resume)

    # The engine starts first; the endpoints are awaited only then (the learner starts meanwhile).
    return run_sampler(
        config,
        args.run_dir,
        args.model,
        args.sampler_id,
        lambda: wait_for_endpoints(args.run_dir, config.pipeline.startup_timeout_s),
        reward_cpus=_cores(args.reward_cpus),
    )


SAMPLER_LOOP_ENV = "SPEED_ASYNC_SAMPLER_LOOP"
"""Benchmarks only: `module:Class`, a SamplerLoop subclass a sampler runs instead (benchmarks/long_tail.py compares
the continuous sampler with the old one-call-per-round shape kept in benchmarks/long_tail_loops.py)."""


def sampler_loop_class() -> type:
    """SamplerLoop, or the subclass `SPEED_ASYNC_SAMPLER_LOOP` names; ValueError naming the variable and its value
    when it is not `module:Class` of an importable SamplerLoop subclass."""
    import importlib

    from speed_async.sampler.loop import SamplerLoop

    spec = os.environ.get(SAMPLER_LOOP_ENV)
    if not spec:
        return SamplerLoop
    module, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{SAMPLER_LOOP_ENV}={spec!r} cannot be loaded ({err}); allowed: module:Class") from None
    if not (isinstance(cls, type) and issubclass(cls, SamplerLoop)):
        raise ValueError(f"{SAMPLER_LOOP_ENV}={spec!r} is not a subclass of speed_async.sampler.loop.SamplerLoop")
    return cls


def run_sampler(
    config: Config,
    run_dir: Path,
    model: str,
    sampler_id: int,
    endpoints: dict | Callable[[], dict],
    reward_cpus: set[int] | None = None,
) -> int:
    """Run sampler `sampler_id` against the learner's `endpoints` until the learner stops it (its reward
    workers on `reward_cpus`, default: the sampler's own); its time budget goes to run_dir/sampler-<id>.json.
    Returns 0, or EXIT_LEARNER_UNRESPONSIVE (3) after logging what it waited for when the learner stopped
    answering."""
    from speed_async.sampler.loop import LearnerUnresponsive, SamplerEndpoints
    from speed_async.transport import load_shared_key

    device = config.cluster.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from speed_async.sampler.engine import enable_cpu_huge_pages

        enable_cpu_huge_pages()  # before the engine allocates its weights and KV cache

    def resolve() -> SamplerEndpoints:
        found = endpoints() if callable(endpoints) else endpoints
        return SamplerEndpoints(work=found["work"], results=found["results"])

    loop = sampler_loop_class()(
        config,
        sampler_id,
        resolve,
        model,
        key=load_shared_key(config.cluster.shared_key_file or None),
        device=device,
        reward_cpus=reward_cpus,
    )
    log = logging.getLogger("speed_async.sampler")
    try:
        reason = loop.run()
        log.info("stopping: %s; stats %s", reason, loop.stats)
        write_json(run_dir / f"sampler-{sampler_id}.json", loop.stats)
    except LearnerUnresponsive as err:
        log.error("%s", err)
        return EXIT_LEARNER_UNRESPONSIVE
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
