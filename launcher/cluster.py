"""Multi-node launch: `speed-async train` run by torchrun on every node; each worker takes its role from its
global rank.

```
torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 \\
    -m speed_async train --config my.toml cluster.num_learner_ranks=4 cluster.bind_host=0.0.0.0
```
Global ranks 0 .. L-1 (L = cluster.num_learner_ranks) are the learner's FSDP ranks, ranks L .. W-1 are samplers
0 .. W-L-1 (cluster.num_samplers becomes W - L). Everything the workers share goes through torchrun's
rendezvous store, so no shared filesystem is needed: rank 0 resolves the config and the run directory and
publishes them; the learner ranks form their own process group of L ranks on a prefix of that store; learner
rank 0 publishes its socket endpoints there and every sampler waits for them (bounded). torchrun supervises
the workers; a worker that fails logs its role and error first, and torchrun reports its exit code. A worker
dies with its torchrun agent (speed_async.lifetime: a parent-death signal set at start-up, and a guard that
takes the worker's process group with it), and rank 0 holds the run directory's lock (speed_async.rundir)
for the run's life.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from speed_async.config import Config, config_from_dict, config_to_dict, write_resolved_config
from speed_async.lifetime import die_with_the_run
from speed_async.rundir import RunDirLock, take_run_dir

KEY_CONFIG = "speed_async/config"
KEY_RUN_DIR = "speed_async/run_dir"
KEY_ENDPOINTS = "speed_async/endpoints"
LEARNER_PREFIX = "speed_async/learners"


@dataclass(frozen=True)
class WorkerRole:
    """What one torchrun worker does."""

    kind: str  # "learner" or "sampler"
    index: int  # learner rank or sampler id
    global_rank: int
    world_size: int

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.index}]"


def under_torchrun() -> bool:
    """True inside a torchrun worker (its agent sets TORCHELASTIC_RUN_ID, RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"))


def assign_role(global_rank: int, world_size: int, num_learner_ranks: int) -> WorkerRole:
    """Ranks below num_learner_ranks learn, the rest sample; ValueError when no rank is left to sample."""
    if world_size <= num_learner_ranks:
        raise ValueError(
            f"cluster.num_learner_ranks = {num_learner_ranks} is invalid for torchrun's world of {world_size} "
            "workers: at least one worker must be left for a sampler (start more workers or lower it)"
        )
    if global_rank < num_learner_ranks:
        return WorkerRole("learner", global_rank, global_rank, world_size)
    return WorkerRole("sampler", global_rank - num_learner_ranks, global_rank, world_size)


def cluster_config(config: Config, world_size: int) -> Config:
    """`config` with cluster.num_samplers = world_size - num_learner_ranks (the workers torchrun started)."""
    assign_role(0, world_size, config.cluster.num_learner_ranks)
    samplers = world_size - config.cluster.num_learner_ranks
    return replace(config, cluster=replace(config.cluster, num_samplers=samplers))


def _store(timeout_s: float):  # -> torch.distributed.Store
    """torchrun's rendezvous store (the agent's, or rank 0's), via the env:// rendezvous."""
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    return store


def _get(store, key: str, timeout_s: float, who: str) -> bytes:
    """store[key], waiting at most `timeout_s`; TimeoutError naming `who` should have written it."""
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as exc:  # the store raises a plain RuntimeError / DistStoreError on timeout
        raise TimeoutError(f"{who} did not publish {key!r} on torchrun's store within {timeout_s:.0f} s") from exc
    return store.get(key)


def _pin_sampler_device(config: Config, local_rank: int) -> None:
    """A sampler's vLLM engine uses GPU LOCAL_RANK of this node (CUDA_VISIBLE_DEVICES narrowed to it) unless
    cluster.device is cpu; on CPU its threads bind to this process's cores."""
    if config.cluster.device != "cpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else None
        if devices is None or len(devices) > 1:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[local_rank] if devices else str(local_rank)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))


def run_worker(config: Config, resume: bool = False) -> int:
    """The body of one torchrun worker of a multi-node run: take the role of the global rank and run it
    (`resume`: the learner continues trainer.run_dir from its newest complete checkpoint, which every learner
    node must see, e.g. on a shared filesystem)."""
    from launcher.train import check_resumable, make_run_dir, resolve_model

    die_with_the_run()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    role = assign_role(rank, world, config.cluster.num_learner_ranks)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {role.name} (rank {rank}) %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("speed_async.cluster")
    timeout = config.pipeline.sync_timeout_s
    lock: RunDirLock | None = None
    try:
        store = _store(timeout)
        if rank == 0:
            config = cluster_config(config, world)
            run_dir = make_run_dir(config)
            lock, note = take_run_dir(run_dir, "resume" if resume else "train")
            if note:
                print(f"speed-async: {note}", file=sys.stderr, flush=True)
            if resume:
                check_resumable(config, run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "endpoints.json").unlink(missing_ok=True)
            write_resolved_config(config, run_dir)
            store.set(KEY_CONFIG, json.dumps(config_to_dict(config)))
            store.set(KEY_RUN_DIR, str(run_dir))
            print(f"speed-async: run directory {run_dir}; {world} workers: {role.name} is rank 0", flush=True)
        else:
            config = config_from_dict(json.loads(_get(store, KEY_CONFIG, timeout, "rank 0")), origin="rank 0")
            run_dir = Path(_get(store, KEY_RUN_DIR, timeout, "rank 0").decode())
            run_dir.mkdir(parents=True, exist_ok=True)
        model = resolve_model(config.model.path)
        from speed_async.rewards import check_functions

        check_functions(config.reward.functions)  # on every node: its reward workers import them
        log.info("role %s of %d workers; run directory %s; model %s", role.name, world, run_dir, model)
        if role.kind == "learner":
            return _run_learner(config, role, store, run_dir, model, resume)
        _pin_sampler_device(config, local_rank)
        endpoints = json.loads(_get(store, KEY_ENDPOINTS, timeout, "learner rank 0"))
        from launcher.roles import run_sampler

        return run_sampler(config, run_dir, model, role.index, endpoints)
    except BaseException as exc:
        if not isinstance(exc, SystemExit | KeyboardInterrupt):
            print(
                f"speed-async: {role.name} (global rank {rank}) failed: {exc!r}\n{traceback.format_exc()}",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        if lock is not None:
            lock.release()


def _run_learner(config: Config, role: WorkerRole, store, run_dir: Path, model: str, resume: bool) -> int:
    """Join the learners' process group (L ranks on a prefix of torchrun's store) and train."""
    import torch
    import torch.distributed as dist

    from speed_async.learner.main import resolve_device, run_learner
    from speed_async.learner.model import backend_for

    device = resolve_device(config.cluster.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    dist.init_process_group(
        backend=backend_for(device),
        store=dist.PrefixStore(LEARNER_PREFIX, store),
        rank=role.index,
        world_size=config.cluster.num_learner_ranks,
        device_id=device if device.type == "cuda" else None,
        timeout=timedelta(seconds=config.pipeline.collective_timeout_s),
    )

    def announce(endpoints: dict) -> None:
        store.set(KEY_ENDPOINTS, json.dumps(endpoints))

    return run_learner(config, run_dir, model, resume=resume, announce=announce)
