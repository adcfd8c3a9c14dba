"""One sampler process against endpoints the caller serves: for benchmarks and tests that play the dispatcher.

The process is the real `launcher.roles sampler` role (its own vLLM engine), started in its own process group
so that the caller can end it by PID; its output goes to run_dir/sampler-<id>.log. Like a launcher's role it
dies with the process that started it (speed_async.lifetime), so start it from the caller's main thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from speed_async.config import Config, write_resolved_config
from speed_async.lifetime import LAUNCHER_PID_ENV, preexec_die_with_parent
from speed_async.rundir import write_json

REPO = Path(__file__).resolve().parents[1]


def role_env() -> dict[str, str]:
    """The environment of a standalone role process: in-process vLLM, 1 GiB KV cache, this checkout first."""
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        PYTHONPATH=str(REPO),
    )
    return env


def start_sampler(
    config: Config,
    run_dir: Path,
    model: Path,
    sampler_id: int,
    endpoints: dict,
    *,
    cpus: str | None = None,
    reward_cpus: str | None = None,
) -> subprocess.Popen:
    """Start sampler `sampler_id` connected to `endpoints` ({"work": ..., "results": ...}); `cpus` pins it and
    its engine threads (one per core), `reward_cpus` its reward workers, as `speed-async train` does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run_dir)
    write_json(run_dir / "endpoints.json", endpoints)
    log = (run_dir / f"sampler-{sampler_id}.log").open("wb")
    argv = [sys.executable, "-m", "launcher.roles", "sampler", "--run-dir", str(run_dir), "--model", str(model)]
    argv += ["--sampler-id", str(sampler_id)]
    env = {**role_env(), LAUNCHER_PID_ENV: str(os.getpid())}
    if cpus:
        argv += ["--cpus", cpus, "--reward-cpus", reward_cpus or cpus]
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=preexec_die_with_parent(),  # takes no lock in the child: see speed_async/lifetime.py
    )


def kill_group(proc: subprocess.Popen, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a started process and its children by process group id (never by name) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
