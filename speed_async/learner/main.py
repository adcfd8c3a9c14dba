"""The learner role: every rank under torchrun trains; rank 0 also dispatches, publishes weights and logs.

```
 rank 0:  batch(s) <- dispatcher ─► broadcast_groups ─► train_step ─► gather full state ─► publisher thread:
 rank r:               broadcast_groups ─► train_step ─► gather full state        announce v=s+1, broadcast
                                                                                 to samplers, mark published
```
Step s trains on groups of versions >= s - k (checked by the dispatcher) and produces version s + 1. The
gather walks the parameters in the same order on every rank (FSDP `full_tensor()` in lockstep) and nothing
else runs on the FSDP group meanwhile. Publishing runs in a thread, so with k >= 1 the next step trains while
the samplers receive the new weights; with k = 0 the dispatcher has no usable work until they have it.

Checkpoints (speed_async.learner.checkpoint) are written after the step that produces version S when S is a
multiple of trainer.save_every and at the last step, and when the run has to stop early: rank 0 gives up the
batch of step S (no sampler alive for pipeline.rejoin_timeout_s, no progress, a stop request from the
launcher, weights that cannot be published) and scatters an empty batch instead; on that signal every rank
writes checkpoint S and the learner exits with status 1 and an error naming the cause (`TrainingStopped`).
A resumed run loads the newest complete one on every rank, publishes the restored weights (version S) to the
samplers, which start from the base model, before any work goes out (the dispatcher gives no work to a
sampler below S), and continues at step S.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from speed_async.config import Config
from speed_async.curriculum.train_group import TrainGroup
from speed_async.learner.checkpoint import (
    HeadState,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    remove_incomplete,
    save_checkpoint,
    should_save,
)
from speed_async.learner.head import DispatcherError, Head, PublishError, resolve_device
from speed_async.learner.model import init_distributed, iter_full_state, save_hf
from speed_async.learner.scatter import broadcast_groups
from speed_async.learner.train_step import Learner

log = logging.getLogger("speed_async.learner")
STOP_PUBLISH_WAIT_S = 5.0
"""When the run stops early, how long rank 0 lets a weight broadcast in flight finish before it exits anyway
(one to a lost sampler would hold the exit for pipeline.sync_timeout_s)."""


class TrainingStopped(RuntimeError):
    """The run stopped before its last step, after writing a checkpoint (the message says why and where)."""


def group_metrics(groups: list[TrainGroup], step: int) -> dict[str, float]:
    """Staleness and group statistics of one step's batch."""
    lags = np.array([step - g.version for g in groups], dtype=np.float64)
    sizes = [len(g.responses) for g in groups]
    pass_rates = [float(np.mean(g.rewards > 0.5)) for g in groups]
    lengths = [len(r) for g in groups for r in g.responses]
    return {
        "staleness/max": float(lags.max()),
        "staleness/mean": float(lags.mean()),
        "train/group_size_min": float(min(sizes)),
        "train/group_size_max": float(max(sizes)),
        "train/pass_rate_min": float(min(pass_rates)),
        "train/pass_rate_max": float(max(pass_rates)),
        "train/reward_mean": float(np.mean([g.rewards.mean() for g in groups])),
        "train/response_length_mean": float(np.mean(lengths)),
        "train/response_tokens": float(sum(lengths)),
    }


def _restore(run_dir: Path, learner: Learner) -> tuple[int, HeadState | None]:
    """Load the newest complete checkpoint of `run_dir` (every rank); rank 0 then removes incomplete ones."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise ValueError(f"no complete checkpoint under {checkpoint_root(run_dir)}: nothing to resume")
    version, head = load_checkpoint(found[1], learner.model, learner.optimizer, learner.scheduler)
    if dist.get_rank() == 0:
        for path in remove_incomplete(run_dir):
            log.info("removed incomplete checkpoint %s", path)
    log.info("resumed from %s (version %d)", found[1], version)
    return version, head


def run_learner(
    config: Config,
    run_dir: Path,
    model_path: str,
    resume: bool = False,
    announce: Callable[[dict], None] | None = None,
) -> int:
    """Entry point of one learner rank (the launcher runs it under torchrun); `resume` continues `run_dir`
    from its newest complete checkpoint. Rank 0 writes its socket endpoints to run_dir/endpoints.json and
    also hands them to `announce` (the multi-node launcher publishes them on torchrun's store)."""
    device = init_distributed(resolve_device(config.cluster.device), timeout_s=config.pipeline.collective_timeout_s)
    rank = dist.get_rank()
    torch.manual_seed(config.trainer.seed)
    learner = Learner(config, model_path, device)
    start, restored = _restore(run_dir, learner) if resume else (0, None)
    head = Head(config, run_dir, model_path, restored, announce) if rank == 0 else None
    try:
        if head is not None:
            head.start()
        if start:
            # The samplers hold the base model (version 0): publish the restored weights first.
            named = list(iter_full_state(learner.model))
            if head is not None:
                head.publish(start, named)
        stop: BaseException | None = None  # rank 0: why the run must stop at the next step
        mark, checkpoint_s = time.perf_counter(), 0.0  # a step's span starts where the previous record ended
        for step in range(start, config.trainer.total_steps):
            t0 = time.perf_counter()
            groups: list[TrainGroup] | None = None
            if head is not None:
                try:
                    groups = head.next_batch(step) if stop is None else []
                except (DispatcherError, PublishError) as err:
                    stop, groups = err, []
            t1 = time.perf_counter()
            groups = broadcast_groups(groups, src=0)
            t2 = time.perf_counter()
            if not groups:  # rank 0 gave up this step: checkpoint version `step` on every rank, then stop
                path = _checkpoint_on_stop(config, run_dir, step, start, resume, learner, head)
                raise TrainingStopped(
                    f"stopped before step {step}: {stop}. Checkpoint of version {step}: {path}; continue with "
                    f"`speed-async train --resume {run_dir}`"
                    if head is not None
                    else f"stopped before step {step} by learner rank 0 (its log says why)"
                )
            stats = learner.train_step(groups, step)
            t3 = time.perf_counter()
            named = [(name, tensor) for name, tensor in iter_full_state(learner.model)]
            t4 = time.perf_counter()
            final = step + 1 == config.trainer.total_steps or _agree_over_budget(head, config, device)
            if head is not None:
                try:
                    head.publish(step + 1, named, final=final)
                except PublishError as err:
                    stop = err
                now = time.perf_counter()
                train_parts = {
                    "plan": stats["seconds_plan"],
                    "pi_old": stats["seconds_old_logprobs"],
                    "forward": stats["seconds_forward"],
                    "backward": stats["seconds_backward"],
                    "optimizer": stats["seconds_optimizer"],
                }
                parts = {
                    "checkpoint": checkpoint_s,
                    "wait_batch": t1 - t0,
                    "scatter": t2 - t1,
                    **train_parts,
                    "train_other": t3 - t2 - sum(train_parts.values()),
                    "gather": t4 - t3,
                    "publish": now - t4,
                }
                record = {
                    "step": step,
                    "policy_version": step + 1,
                    "time/step": now - mark,
                    "time/wait_batch": t1 - t0,
                    "time/train": t3 - t2,
                    "time/gather": t4 - t3,
                    **group_metrics(groups, step),
                    **{f"train/{k}": v for k, v in stats.items()},
                }
                mark = now
                head.log_step(record, parts)
            checkpoint_s = 0.0
            if final or should_save(step + 1, config.trainer.save_every, config.trainer.total_steps):
                t0 = time.perf_counter()
                snapshot = head.snapshot(step + 1) if head is not None else None
                path = save_checkpoint(run_dir, step + 1, learner.model, learner.optimizer, learner.scheduler, snapshot)
                checkpoint_s = time.perf_counter() - t0
                if head is not None:
                    log.info("checkpoint %s written in %.2f s", path, checkpoint_s)
            if final:
                if head is not None and step + 1 < config.trainer.total_steps:
                    log.info("trainer.time_budget_s = %s reached after step %d", config.trainer.time_budget_s, step)
                break
        if head is not None:
            head.finish()
        save_hf(learner.model, model_path, run_dir / "final_model")  # gathers on every rank, rank 0 writes
        return 0
    except TrainingStopped as err:
        log.error("%s", err)
        if head is not None and not head.close(publish_wait_s=STOP_PUBLISH_WAIT_S):
            # The checkpoint and logs are written; the weight-sync group's destructor would wait for the
            # broadcast in flight, so leave without running it.
            log.warning("a weight broadcast to lost samplers is still in flight; exiting without waiting for it")
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        head = None
        return 1
    finally:
        if head is not None:
            head.close()
        dist.destroy_process_group()


def _agree_over_budget(head: Head | None, config: Config, device: torch.device) -> bool:
    """Whether rank 0's run time less evaluation time is past trainer.time_budget_s, agreed by every rank (one
    broadcast)."""
    budget = config.trainer.time_budget_s
    if not budget:
        return False
    spent = time.time() - head.t_start - head.eval_seconds if head is not None else 0.0
    flag = torch.tensor([head is not None and spent >= budget], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _checkpoint_on_stop(
    config: Config, run_dir: Path, step: int, start: int, resumed: bool, learner: Learner, head: Head | None
) -> Path:
    """Every rank: write checkpoint `step` (weights after `step` RL steps) unless one exists already (the one
    resumed from, or the regular one written after the previous step). Returns its directory."""
    if (step == start and resumed) or (step > start and should_save(step, config.trainer.save_every, 0)):
        return checkpoint_root(run_dir) / f"step-{step}"
    snapshot = head.snapshot(step) if head is not None else None
    return save_checkpoint(run_dir, step, learner.model, learner.optimizer, learner.scheduler, snapshot)
