"""`speed-async train` on one machine: the learner under torchrun plus the sampler processes, supervised.

Processes are tracked and ended by PID (their own process groups, listed in run_dir/pids.json together with
the learner's rank-0 worker, which torchrun starts in a process group of its own), never by name.
- The learner exits: with an error, it is reported (role, exit code, its own error lines, its log) and the
  samplers are stopped; with success, the samplers (already told to stop) get a moment to exit on their own.
- A sampler exits with an error (killed, crashed): it is reported with its role and exit code and started
  again under the same sampler id (it rejoins the run and gets the current weights before any work), at most
  cluster.max_sampler_restarts times per sampler. One more failure stops the run: the launcher asks the
  learner to stop (run_dir/stop_request), which writes a checkpoint and exits; then everything is stopped.
- A sampler that exits with status 3 found the learner unresponsive: the run is stopped, nothing restarted.
Stopping sends SIGTERM (and SIGCONT, so that a stopped process can act on it), then SIGKILL after a grace.
Every process dies with the launcher, whatever ends it (speed_async.lifetime): its children are started from
the main thread with a parent-death signal, and each role guards its own process group. The run directory is
the run's alone while it lives (speed_async.rundir: an fcntl lock, taken before anything else is done there),
and data and config errors that need no process are found before any starts.
"""

from __future__ import annotations

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

from launcher.report import failure_report
from launcher.roles import role_commands
from speed_async.config import Config, config_from_dict, config_to_dict, write_resolved_config
from speed_async.config.loader import parse_override
from speed_async.lifetime import LAUNCHER_PID_ENV, exists, preexec_die_with_parent, signal_group
from speed_async.rundir import RunDirLock, read_json, take_run_dir, write_json, write_text

STOP_GRACE_S = 20.0
SAMPLER_EXIT_WAIT_S = 30.0
"""After the learner finished (and told the samplers to stop), how long the samplers may take to end their
generation call and exit on their own, writing their stats, before they are signalled."""
STOP_FILE = "stop_request"  # speed_async.learner.main.STOP_FILE (not imported: it would pull in torch)
PREVIOUS_RUN_EXIT_WAIT_S = 15.0
"""Before a run uses its directory, how long the processes an earlier run left listed in pids.json may take to
die (a killed launcher's processes die with it within about a second)."""
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
    log_offset: int = 0
    """Size of the log when this process started (its own lines follow)."""


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_model(path: str) -> str:
    """A shipped model (`builtin:tiny`, `builtin:tiny-long`, `builtin:tiny-countdown`) -> its directory (checked);
    anything else as given."""
    from speed_async.tiny.store import BUILTIN_MODELS, resolve_builtin

    if path.startswith("builtin:"):
        if path not in BUILTIN_MODELS:
            raise ValueError(f"model.path = {path!r} is invalid: allowed builtin models: {sorted(BUILTIN_MODELS)}")
        return str(resolve_builtin(path))
    if not Path(path).is_dir():
        raise ValueError(f"model.path = {path!r} is invalid: not a directory (or one of {sorted(BUILTIN_MODELS)})")
    return path


def make_run_dir(config: Config) -> Path:
    """The configured run directory, or runs/<name>-<timestamp>."""
    if config.trainer.run_dir:
        return Path(config.trainer.run_dir)
    return Path("runs") / f"{config.trainer.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resume_config(run_dir: Path, config_file: Path | None, overrides: list[str]) -> Config:
    """The config of `speed-async train --resume run_dir`: the run's resolved_config.json, where only
    trainer.total_steps may be overridden (raised); anything else is rejected with the key named."""
    if config_file is not None:
        raise ValueError("--config cannot be combined with --resume: a resumed run keeps its resolved_config.json")
    path = run_dir / "resolved_config.json"
    if not path.is_file():
        raise ValueError(f"--resume {run_dir}: {path} does not exist (not a run directory)")
    saved = read_json(
        path, "the run directory is damaged; start a new run (its checkpoints cannot be resumed without it)"
    )
    tree = config_to_dict(config_from_dict(saved, origin=str(path)))
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


def _start(role: str, argv: list[str], extra_env: dict[str, str], run_dir: Path, restarts: int = 0) -> Child:
    """Start a role process in a session of its own that dies with this process (call from the main thread)."""
    env = dict(os.environ)
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "offline")
    env.update(extra_env)
    log_path = run_dir / "logs" / f"{role.replace('[', '-').replace(']', '')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("ab")
    offset = log_file.tell()
    proc = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=preexec_die_with_parent(),  # takes no lock in the child: see speed_async/lifetime.py
    )
    log_file.close()
    return Child(role, proc, log_path, argv, extra_env, restarts, log_offset=offset)


def write_pids(run_dir: Path, children: list[Child], extra: dict[str, int] | None = None) -> None:
    """run_dir/pids.json: {role: pid} of the current processes (replaced atomically on every restart), plus
    `extra` (the learner's rank-0 worker, which torchrun starts in a process group of its own)."""
    write_json(run_dir / "pids.json", {**{c.role: c.proc.pid for c in children}, **(extra or {})})


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
            signal_group(child.proc.pid, signal.SIGTERM)
            signal_group(child.proc.pid, signal.SIGCONT)
    for pid in others or []:
        signal_group(pid, signal.SIGTERM)
        signal_group(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(child.proc.pid, signal.SIGKILL)
            child.proc.wait(timeout=10)
    for pid in others or []:
        while exists(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        signal_group(pid, signal.SIGKILL)


def wait_for_exit(children: list[Child], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Wait until every child has exited, at most `timeout_s`; True if they all did."""
    deadline = time.monotonic() + timeout_s
    while any(child.proc.poll() is None for child in children):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def _report(child: Child, code: int) -> None:
    print(
        failure_report(child.role, child.proc.pid, code, child.log_path, child.log_offset), file=sys.stderr, flush=True
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
                write_text(run_dir / STOP_FILE, stopping + "\n")
                stop_deadline = time.monotonic() + stop_wait_s
            child.given_up = True
        time.sleep(poll_s)


def check_data(config: Config, model: str) -> str:
    """Load and encode the run's prompts as the learner will (its tokenizer, speed_async.data.prepare), so that
    a bad row or an over-long prompt is an error (DataError, a ValueError) before any process starts; then
    import every reward.functions entry as the reward workers will, so that a path that does not resolve, or a
    source that is none of the data's, is a ValueError naming it. Returns a line that says what was found."""
    import logging

    from speed_async.data.prepare import prepare_prompts

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.path = {model!r} is invalid: its tokenizer cannot be loaded ({err})") from None
    quiet = logging.getLogger("speed_async.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the learner logs every skipped row; here only the counts are shown
    try:
        found = [(role, prepare_prompts(files, tokenizer, config.data)) for role, files in
                 (("train", config.data.train_files), ("eval", config.data.eval_files)) if files]  # fmt: skip
    finally:
        quiet.setLevel(level)
    from speed_async.rewards import check_functions

    check_functions(config.reward.functions, {p.data_source for _, prepared in found for p in prepared.prompts})
    counts = []
    for role, prepared in found:
        left_out = len(prepared.skipped_rows) + len(prepared.overlong)
        counts.append(f"{len(prepared.prompts)} {role} prompts" + (f" ({left_out} skipped)" if left_out else ""))
    return "data: " + ", ".join(counts)


def run_train(config: Config, resume: bool = False) -> int:
    """Run a whole training job on this machine and return its exit status (`resume`: continue the run in
    trainer.run_dir from its newest complete checkpoint, see `resume_config`). The run directory is locked
    first (a live run there is refused at once); the model and data are checked before any process starts."""
    run_dir = make_run_dir(config)
    command = "resume" if resume else "train"
    lock = _take(run_dir, command) if resume or run_dir.exists() else None
    try:
        model = resolve_model(config.model.path)
        from_step = check_resumable(config, run_dir) if resume else 0
        found = check_data(config, model)
        lock = lock or _take(run_dir, command)
        resumed = f", resuming at step {from_step}" if resume else ""
        print(f"speed-async: run directory {run_dir}  (model {model}{resumed}); {found}", flush=True)
        return _run(config, run_dir, model, resume)
    finally:
        if lock is not None:
            lock.release()


def _take(run_dir: Path, command: str) -> RunDirLock:
    lock, note = take_run_dir(run_dir, command, previous_exit_wait_s=PREVIOUS_RUN_EXIT_WAIT_S)
    if note:
        print(f"speed-async: {note}", file=sys.stderr, flush=True)
    return lock


def _run(config: Config, run_dir: Path, model: str, resume: bool) -> int:
    from launcher.progress import Progress

    for stale in ("endpoints.json", STOP_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    write_resolved_config(config, run_dir)
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

        try:
            print(final_report(run_dir), flush=True)
        except ValueError as err:  # a damaged metrics.jsonl: the run itself finished
            print(f"speed-async: no final report: {err}", file=sys.stderr, flush=True)
    return status
