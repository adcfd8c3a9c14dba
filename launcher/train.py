"""`speed-async train` on one machine: the learner under torchrun plus the sampler processes, supervised.

Processes are tracked and ended by PID (their own process groups, listed in run_dir/pids.json together with
the learner's rank-0 worker, which torchrun starts in a process group of its own), never by name.
- The learner exits: with an error, it is reported (role, exit code, the end of its log) and the samplers are
  stopped; with success, the samplers (already told to stop) get a moment to exit on their own.
- A sampler exits with an error (killed, crashed): it is reported with its role and exit code and started
  again under the same sampler id (it rejoins the run and gets the current weights before any work), at most
  cluster.max_sampler_restarts times per sampler. One more failure stops the run: the launcher asks the
  learner to stop (run_dir/stop_request), which writes a checkpoint and exits; then everything is stopped.
- A sampler that exits with status 3 found the learner unresponsive: the run is stopped, nothing restarted.
Stopping sends SIGTERM (and SIGCONT, so that a stopped process can act on it), then SIGKILL after a grace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from speed_async.config import Config, config_from_dict, config_to_dict, write_resolved_config
from speed_async.config.loader import parse_override

STOP_GRACE_S = 20.0
SAMPLER_EXIT_WAIT_S = 30.0
"""After the learner finished (and told the samplers to stop), how long the samplers may take to end their
generation call and exit on their own, writing their stats, before they are signalled."""
STOP_FILE = "stop_request"  # speed_async.learner.main.STOP_FILE (not imported: it would pull in torch)
EXIT_LEARNER_UNRESPONSIVE = 3  # launcher.roles.EXIT_LEARNER_UNRESPONSIVE


@dataclass
class Child:
    """A started role process (and how to start it again)."""

    role: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    restarts: int = 0
    given_up: bool = False
    """Failed once more than allowed: reported and no longer watched."""


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_model(path: str) -> str:
    """`builtin:tiny` -> the cached embedded tiny model (built on first use); anything else as given."""
    if path == "builtin:tiny":
        from speed_async.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    if not Path(path).is_dir():
        raise ValueError(f"model.path = {path!r} is invalid: not a directory (or use 'builtin:tiny')")
    return path


def make_run_dir(config: Config) -> Path:
    """The configured run directory, or runs/<name>-<timestamp>."""
    if config.trainer.run_dir:
        return Path(config.trainer.run_dir)
    return Path("runs") / f"{config.trainer.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def cpu_plan(config: Config) -> tuple[list[str], list[str]]:
    """Cores for the learner and for each sampler on a CPU machine: dedicated cores when there are enough
    (like dedicated GPUs), otherwise everything shared."""
    cores = sorted(os.sched_getaffinity(0))
    learners, samplers = config.cluster.num_learner_ranks, config.cluster.num_samplers
    if len(cores) < learners + samplers:
        shared = ",".join(map(str, cores))
        return [shared], [shared] * samplers
    per_sampler = max(1, (len(cores) - learners) // samplers)
    learner_cores = ",".join(map(str, cores[:learners]))
    rest = cores[learners:]
    sampler_cores = [",".join(map(str, rest[i * per_sampler : (i + 1) * per_sampler])) for i in range(samplers)]
    return [learner_cores], sampler_cores


def resume_config(run_dir: Path, config_file: Path | None, overrides: list[str]) -> Config:
    """The config of `speed-async train --resume run_dir`: the run's resolved_config.json, where only
    trainer.total_steps may be overridden (raised); anything else is rejected with the key named."""
    if config_file is not None:
        raise ValueError("--config cannot be combined with --resume: a resumed run keeps its resolved_config.json")
    path = run_dir / "resolved_config.json"
    if not path.is_file():
        raise ValueError(f"--resume {run_dir}: {path} does not exist (not a run directory)")
    tree = config_to_dict(config_from_dict(json.loads(path.read_text()), origin=str(path)))
    for text in overrides:
        key, value = parse_override(text)
        if key != "trainer.total_steps":
            raise ValueError(
                f"override {key} is not allowed with --resume: a resumed run keeps {path}; only "
                "trainer.total_steps may be raised"
            )
        if not isinstance(value, int) or value < tree["trainer"]["total_steps"]:
            raise ValueError(
                f"trainer.total_steps = {value!r} is invalid with --resume: it may only be raised (the run has "
                f"{tree['trainer']['total_steps']})"
            )
        tree["trainer"]["total_steps"] = value
    tree["trainer"]["run_dir"] = str(run_dir)
    return config_from_dict(tree, origin=f"{path} (resumed)")


def check_resumable(config: Config, run_dir: Path) -> int:
    """The version of the newest complete checkpoint of `run_dir`; ValueError if there is none or the run is
    already at trainer.total_steps."""
    from speed_async.learner.checkpoint import checkpoint_root, latest_checkpoint

    found = latest_checkpoint(run_dir)
    if found is None:
        raise ValueError(
            f"--resume {run_dir}: no complete checkpoint under {checkpoint_root(run_dir)} (start a new run instead)"
        )
    if found[0] >= config.trainer.total_steps:
        raise ValueError(
            f"--resume {run_dir}: the newest checkpoint is at step {found[0]} = trainer.total_steps; raise "
            "trainer.total_steps to train further"
        )
    return found[0]


def role_commands(
    config: Config, run_dir: Path, model: str, resume: bool = False
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(role, argv, extra env) of every process of a single-machine run (`resume`: the learner continues
    from the run's newest checkpoint)."""
    on_cpu = config.cluster.device == "cpu" or (config.cluster.device == "auto" and not _has_cuda())
    learner_cores, sampler_cores = cpu_plan(config) if on_cpu else ([""], [""] * config.cluster.num_samplers)
    py = sys.executable
    learner = [
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.cluster.num_learner_ranks}",
        "-m", "launcher.roles", "learner", "--run-dir", str(run_dir), "--model", model,
    ]  # fmt: skip
    if learner_cores[0]:
        learner += ["--cpus", learner_cores[0]]
    if resume:
        learner.append("--resume")
    cmds: list[tuple[str, list[str], dict[str, str]]] = [("learner", learner, {"OMP_NUM_THREADS": "1"})]
    for i in range(config.cluster.num_samplers):
        argv = [py, "-m", "launcher.roles", "sampler", "--run-dir", str(run_dir), "--model", model]
        argv += ["--sampler-id", str(i)]
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if sampler_cores[i]:
            argv += ["--cpus", sampler_cores[i]]
            env["VLLM_CPU_OMP_THREADS_BIND"] = sampler_cores[i]
        cmds.append((f"sampler[{i}]", argv, env))
    return cmds


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _start(role: str, argv: list[str], extra_env: dict[str, str], run_dir: Path, restarts: int = 0) -> Child:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "offline")
    env.update(extra_env)
    log_path = run_dir / "logs" / f"{role.replace('[', '-').replace(']', '')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("ab")
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log_file.close()
    return Child(role, proc, log_path, argv, extra_env, restarts)


def write_pids(run_dir: Path, children: list[Child], extra: dict[str, int] | None = None) -> None:
    """run_dir/pids.json: {role: pid} of the current processes (replaced atomically on every restart), plus
    `extra` (the learner's rank-0 worker, which torchrun starts in a process group of its own)."""
    tmp = run_dir / "pids.json.tmp"
    tmp.write_text(json.dumps({**{c.role: c.proc.pid for c in children}, **(extra or {})}))
    tmp.replace(run_dir / "pids.json")


def _learner_worker(run_dir: Path) -> dict[str, int]:
    """{"learner[0]": pid} of learner rank 0 once it has written endpoints.json, else {}."""
    try:
        return {"learner[0]": int(json.loads((run_dir / "endpoints.json").read_text())["pid"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def stop_children(children: list[Child], grace_s: float = STOP_GRACE_S, others: list[int] | None = None) -> None:
    """SIGTERM (and SIGCONT, for stopped ones) each child's process group and the process groups `others`
    (the learner's workers, which torchrun puts in groups of their own), then SIGKILL what is left after
    `grace_s` (by PID only)."""
    for child in children:
        if child.proc.poll() is None:
            _signal_group(child.proc.pid, signal.SIGTERM)
            _signal_group(child.proc.pid, signal.SIGCONT)
    for pid in others or []:
        _signal_group(pid, signal.SIGTERM)
        _signal_group(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.proc.wait(timeout=10)
    for pid in others or []:
        while _exists(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(pid, signal.SIGKILL)


def wait_for_exit(children: list[Child], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Wait until every child has exited, at most `timeout_s`; True if they all did."""
    deadline = time.monotonic() + timeout_s
    while any(child.proc.poll() is None for child in children):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
    return f"exited with code {code}"


def _last_error(path: Path) -> str:
    """The last ERROR line a role logged (its own account of why it failed), or ''."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line for line in reversed(lines) if " ERROR: " in line), "")


def _report(child: Child, code: int) -> None:
    error = _last_error(child.log_path)
    print(
        f"speed-async: {child.role} (pid {child.proc.pid}) {_describe_exit(code)}"
        + (f"; its last error: {error}" if error else "")
        + f"\nlast lines of {child.log_path}:\n{_tail(child.log_path)}",
        file=sys.stderr,
        flush=True,
    )


def supervise(
    children: list[Child],
    progress: object | None = None,
    poll_s: float = 0.5,
    *,
    run_dir: Path | None = None,
    max_restarts: int = 0,
    stop_wait_s: float = 600.0,
) -> int:
    """Wait for the learner (children[0]) to finish, restarting failed samplers (see the module docstring).
    Returns the exit status of the run: 0 when the learner finished, 1 otherwise."""
    learner, samplers = children[0], children[1:]
    stopping: str | None = None
    stop_deadline = 0.0
    worker: dict[str, int] = {}
    while True:
        if progress is not None:
            progress.update()
        if not worker and run_dir is not None and (worker := _learner_worker(run_dir)):
            write_pids(run_dir, children, worker)
        code = learner.proc.poll()
        if code is not None:
            if code != 0:
                _report(learner, code)
                stop_children(samplers, others=list(worker.values()))
                if stopping is not None:
                    print(f"speed-async: run stopped: {stopping}", file=sys.stderr, flush=True)
                return 1
            # The learner told the samplers to stop; give them a moment to exit on their own.
            wait_for_exit(samplers, SAMPLER_EXIT_WAIT_S)
            stop_children(samplers, grace_s=STOP_GRACE_S)
            return 0 if stopping is None else 1
        if stopping is not None and time.monotonic() > stop_deadline:
            print(
                f"speed-async: the learner did not stop within {stop_wait_s:.0f} s of the stop request; "
                f"stopping every process ({stopping})",
                file=sys.stderr,
                flush=True,
            )
            stop_children(children, others=list(worker.values()))
            return 1
        for i, child in enumerate(samplers):
            code = child.proc.poll()
            if code is None or code == 0 or child.given_up:
                continue
            _report(child, code)
            if code == EXIT_LEARNER_UNRESPONSIVE:
                print(
                    f"speed-async: {child.role} found the learner unresponsive (its log says what it waited for); "
                    "stopping the run",
                    file=sys.stderr,
                    flush=True,
                )
                stop_children(children, others=list(worker.values()))
                return 1
            if child.restarts < max_restarts and stopping is None and run_dir is not None and child.argv:
                samplers[i] = _start(child.role, child.argv, child.env or {}, run_dir, restarts=child.restarts + 1)
                children[i + 1] = samplers[i]
                write_pids(run_dir, children, worker)
                print(
                    f"speed-async: restarted {child.role} as pid {samplers[i].proc.pid} (restart "
                    f"{child.restarts + 1} of cluster.max_sampler_restarts = {max_restarts})",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            if stopping is None:
                stopping = (
                    f"{child.role} failed {child.restarts + 1} times (cluster.max_sampler_restarts = {max_restarts})"
                )
                print(f"speed-async: {stopping}; asking the learner to checkpoint and stop", file=sys.stderr)
                if run_dir is None:
                    stop_children(children)
                    return 1
                (run_dir / STOP_FILE).write_text(stopping + "\n")
                stop_deadline = time.monotonic() + stop_wait_s
            child.given_up = True
        time.sleep(poll_s)


def run_train(config: Config, resume: bool = False) -> int:
    """Run a whole training job on this machine and return its exit status (`resume`: continue the run in
    trainer.run_dir from its newest complete checkpoint, see `resume_config`)."""
    from launcher.progress import Progress

    model = resolve_model(config.model.path)
    run_dir = make_run_dir(config)
    from_step = check_resumable(config, run_dir) if resume else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("endpoints.json", STOP_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    write_resolved_config(config, run_dir)
    resumed = f", resuming at step {from_step}" if resume else ""
    print(f"speed-async: run directory {run_dir}  (model {model}{resumed})", flush=True)
    commands = role_commands(config, run_dir, model, resume=resume)
    children = [_start(role, argv, env, run_dir) for role, argv, env in commands]
    write_pids(run_dir, children)
    progress = Progress(run_dir, config) if config.logging.progress else None
    pipeline = config.pipeline
    try:
        status = supervise(
            children,
            progress,
            run_dir=run_dir,
            max_restarts=config.cluster.max_sampler_restarts,
            stop_wait_s=5 * pipeline.sampler_timeout_s + 6 * pipeline.sync_timeout_s + 120,
        )
    except KeyboardInterrupt:
        print("speed-async: interrupted; stopping every process", file=sys.stderr)
        stop_children(children)
        status = 130
    finally:
        if progress is not None:
            progress.close()
    if status == 0:
        from launcher.report import final_report

        print(final_report(run_dir), flush=True)
    return status
