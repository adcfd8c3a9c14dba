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

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from speed_async.config import Config
from speed_async.data.prepare import Prompt
from speed_async.learner.batch import TrainGroup
from speed_async.learner.checkpoint import (
    HeadState,
    checkpoint_root,
    effective,
    latest_checkpoint,
    load_checkpoint,
    mark_rolled_back,
    remove_incomplete,
    save_checkpoint,
    should_save,
)
from speed_async.learner.dispatcher import DispatcherError
from speed_async.learner.model import init_distributed, iter_full_state, save_hf
from speed_async.learner.publisher import PublishError
from speed_async.learner.scatter import broadcast_groups
from speed_async.learner.train_step import Learner

log = logging.getLogger("speed_async.learner")
ENDPOINTS_FILE = "endpoints.json"
STOP_FILE = "stop_request"
"""A file the launcher writes into the run directory to make the learner checkpoint and stop (its text: why)."""
STOP_PUBLISH_WAIT_S = 5.0
"""When the run stops early, how long rank 0 lets a weight broadcast in flight finish before it exits anyway
(one to a lost sampler would hold the exit for pipeline.sync_timeout_s)."""


class TrainingStopped(RuntimeError):
    """The run stopped before its last step, after writing a checkpoint (the message says why and where)."""


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def advertised_host(config: Config) -> str:
    """The address samplers on other machines use for the learner's sockets (cluster.advertise_host)."""
    if config.cluster.advertise_host:
        return config.cluster.advertise_host
    if config.cluster.bind_host in ("0.0.0.0", "::", "*"):
        return socket.getfqdn()
    return config.cluster.bind_host


def _advertise(endpoint: str, host: str) -> str:
    """tcp://BIND:PORT -> tcp://HOST:PORT."""
    port = endpoint.rsplit(":", 1)[1]
    return f"tcp://{host}:{port}"


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
    head = _Head(config, run_dir, model_path, restored, announce) if rank == 0 else None
    try:
        if head is not None:
            head.start()
        if start:
            # The samplers hold the base model (version 0): publish the restored weights first.
            named = list(iter_full_state(learner.model))
            if head is not None:
                head.publish(start, named)
        stop: BaseException | None = None  # rank 0: why the run must stop at the next step
        for step in range(start, config.trainer.total_steps):
            t0 = time.perf_counter()
            groups: list[TrainGroup] | None = None
            if head is not None:
                try:
                    groups = head.next_batch(step) if stop is None else []
                except (DispatcherError, PublishError) as err:
                    stop, groups = err, []
            t_wait = time.perf_counter() - t0
            groups = broadcast_groups(groups, src=0)
            if not groups:  # rank 0 gave up this step: checkpoint version `step` on every rank, then stop
                path = _checkpoint_on_stop(config, run_dir, step, start, resume, learner, head)
                raise TrainingStopped(
                    f"stopped before step {step}: {stop}. Checkpoint of version {step}: {path}; continue with "
                    f"`speed-async train --resume {run_dir}`"
                    if head is not None
                    else f"stopped before step {step} by learner rank 0 (its log says why)"
                )
            stats = learner.train_step(groups, step)
            t_train = time.perf_counter() - t0 - t_wait
            named = [(name, tensor) for name, tensor in iter_full_state(learner.model)]
            t_gather = time.perf_counter() - t0 - t_wait - t_train
            final = step + 1 == config.trainer.total_steps or _agree_over_budget(head, config, device)
            if head is not None:
                try:
                    head.publish(step + 1, named, final=final)
                except PublishError as err:
                    stop = err
                record = {
                    "step": step,
                    "policy_version": step + 1,
                    "time/step": time.perf_counter() - t0,
                    "time/wait_batch": t_wait,
                    "time/train": t_train,
                    "time/gather": t_gather,
                    **group_metrics(groups, step),
                    **{f"train/{k}": v for k, v in stats.items()},
                }
                head.log_step(record)
            if final or should_save(step + 1, config.trainer.save_every, config.trainer.total_steps):
                t0 = time.perf_counter()
                snapshot = head.snapshot(step + 1) if head is not None else None
                path = save_checkpoint(run_dir, step + 1, learner.model, learner.optimizer, learner.scheduler, snapshot)
                if head is not None:
                    log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - t0)
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


def _agree_over_budget(head: _Head | None, config: Config, device: torch.device) -> bool:
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
    config: Config, run_dir: Path, step: int, start: int, resumed: bool, learner: Learner, head: _Head | None
) -> Path:
    """Every rank: write checkpoint `step` (weights after `step` RL steps) unless one exists already (the one
    resumed from, or the regular one written after the previous step). Returns its directory."""
    if (step == start and resumed) or (step > start and should_save(step, config.trainer.save_every, 0)):
        return checkpoint_root(run_dir) / f"step-{step}"
    snapshot = head.snapshot(step) if head is not None else None
    return save_checkpoint(run_dir, step, learner.model, learner.optimizer, learner.scheduler, snapshot)


def _first_per_source(prompts: list[Prompt], limit: int) -> list[Prompt]:
    """At most `limit` prompts of each data source (all when limit is 0), in their order."""
    if not limit:
        return prompts
    taken: dict[str, int] = {}
    kept = []
    for prompt in prompts:
        if taken.get(prompt.data_source, 0) < limit:
            taken[prompt.data_source] = taken.get(prompt.data_source, 0) + 1
            kept.append(prompt)
    return kept


class _Head:
    """Rank 0's extra duties: dispatcher, weight publisher, evaluation and metrics."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        model_path: str,
        restored: HeadState | None = None,
        announce: Callable[[dict], None] | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from speed_async.data.prepare import prepare_prompts
        from speed_async.learner.dispatcher import Dispatcher
        from speed_async.learner.ledger import Ledger
        from speed_async.learner.publisher import WeightPublisher
        from speed_async.metrics import MetricsLogger
        from speed_async.transport import load_shared_key

        self.config = config
        self.run_dir = run_dir
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train = prepare_prompts(config.data.train_files, tokenizer, config.data)
        evals = prepare_prompts(config.data.eval_files, tokenizer, config.data) if config.data.eval_files else None
        eval_prompts = _first_per_source(evals.prompts if evals else [], config.trainer.eval_max_prompts)
        key = load_shared_key(config.cluster.shared_key_file or None)
        self.publisher = WeightPublisher(config, device=resolve_device(config.cluster.device))
        self.evaluated: set[int] = set()
        self.eval_seconds = 0.0  # the samplers' time on evaluations so far (from metrics.jsonl on resume)
        if restored is not None:
            self._roll_back(restored)
        self.ledger = Ledger(run_dir, resume=restored is not None)
        self.dispatcher = Dispatcher(
            config,
            train.prompts,
            eval_prompts,
            self.ledger,
            key=key,
            sync_master=(advertised_host(config), self.publisher.master[1]),
            run_dir=run_dir,
            resume=restored is not None,
        )
        if restored is not None:
            reissued = self.dispatcher.restore(restored.dispatch, restored.ready, restored.counters, restored.version)
            log.info("restored %d ready groups; %d in-flight prompts re-issued", len(restored.ready), len(reissued))
        self.publisher.attach(self.dispatcher)
        self.metrics = MetricsLogger(
            run_dir,
            wandb_mode=config.logging.wandb_mode,
            project=config.logging.wandb_project,
            name=config.trainer.name,
            config=json.loads((run_dir / "resolved_config.json").read_text()),
            resume=restored is not None,
        )
        host = advertised_host(config)
        endpoints = {
            "work": _advertise(self.dispatcher.work_endpoint, host),
            "results": _advertise(self.dispatcher.results_endpoint, host),
            "sync": [host, self.publisher.master[1]],
            "pid": os.getpid(),
        }
        tmp = run_dir / (ENDPOINTS_FILE + ".tmp")
        tmp.write_text(json.dumps(endpoints))
        tmp.replace(run_dir / ENDPOINTS_FILE)
        if announce is not None:
            announce(endpoints)
        self.t_start = time.time() - (restored.wall_s if restored is not None else 0.0)
        self.resumed = restored is not None
        self.pending_evals: set[int] = set()
        self.eval_records: dict[int, dict[str, float]] = {}

    def start(self) -> None:
        """Start the dispatcher and publisher threads; wait for every configured sampler to say hello."""
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        self.dispatcher.start()
        self.publisher.start()
        self.dispatcher.wait_for_samplers(self.config.pipeline.startup_timeout_s)
        if self.config.trainer.eval_every and not self.resumed:
            self._request_eval(0)

    def _roll_back(self, restored: HeadState) -> None:
        """Mark the ledger and metrics lines written after the checkpoint rolled back (before reopening them)."""
        for name, offset in (("ledger.jsonl", restored.ledger_offset), ("metrics.jsonl", restored.metrics_offset)):
            marked, torn = mark_rolled_back(self.run_dir / name, offset)
            log.info("%s: %d lines after the checkpoint marked rolled back, %d torn lines dropped", name, marked, torn)
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        self.evaluated = {int(r["step"]) for r in effective(records) if any(k.startswith("eval/") for k in r)}
        self.eval_seconds = sum(float(r.get("eval/seconds", 0.0)) for r in effective(records))

    def snapshot(self, version: int) -> HeadState:
        """The head's part of checkpoint `version`, taken right after the metrics record of step version - 1."""
        snap = self.dispatcher.snapshot(timeout_s=self.config.pipeline.sampler_timeout_s)
        return HeadState(
            version=version,
            dispatch=snap["dispatch"],
            ready=snap["ready"],
            counters=snap["counters"],
            ledger_offset=snap["ledger_offset"],
            metrics_offset=(self.run_dir / "metrics.jsonl").stat().st_size,
            wall_s=time.time() - self.t_start,
        )

    def _request_eval(self, version: int) -> None:
        self.dispatcher.request_eval(version)
        self.pending_evals.add(version)

    def next_batch(self, step: int) -> list[TrainGroup]:
        """The batch of `step`; DispatcherError or PublishError when the run has to stop (see run_learner)."""
        self.publisher.check()
        pipeline = self.config.pipeline
        return self.dispatcher.next_batch(
            step,
            no_progress_s=pipeline.progress_timeout_s,
            rejoin_timeout_s=pipeline.rejoin_timeout_s,
            stop_check=self._stop_requested,
        )

    def _stop_requested(self) -> str | None:
        """The launcher's reason to stop, if it wrote one (run_dir/stop_request)."""
        path = self.run_dir / STOP_FILE
        return path.read_text(errors="replace").strip() or "no reason given" if path.exists() else None

    def publish(self, version: int, named: list[tuple[str, torch.Tensor]], final: bool = False) -> None:
        """Send `version` to the samplers; evaluate it when it is an evaluation step or the `final` one."""
        every = self.config.trainer.eval_every
        want_eval = bool(every) and (version % every == 0 or final) and version not in self.evaluated
        self.publisher.publish(version, named, after=(lambda v=version: self._request_eval(v)) if want_eval else None)

    def _collect_evals(self, timeout_s: float = 0.0) -> None:
        result = self.dispatcher.poll_eval(timeout_s)
        while result is not None:
            version, accs = result.version, result.accuracy
            self.pending_evals.discard(version)
            if accs is None:
                log.warning("evaluation of version %d abandoned: a sampler holding part of it was lost", version)
                result = self.dispatcher.poll_eval(0.0)
                continue
            record = {"step": version, "policy_version": version, "time/wall": time.time() - self.t_start}
            record.update({f"eval/{source}/acc": acc for source, acc in accs.items()})
            record["eval/seconds"] = result.seconds
            self.eval_seconds += result.seconds
            self.metrics.log(record)
            log.info("eval at version %d: %s (%.1f s of sampling)", version, accs, result.seconds)
            result = self.dispatcher.poll_eval(0.0)

    def log_step(self, record: dict[str, float]) -> None:
        record["time/wall"] = time.time() - self.t_start
        record["weight_sync/seconds"] = self.publisher.last_seconds
        record["weight_sync/gbps"] = self.publisher.last_gbps
        record.update(self.dispatcher.state.metrics())
        record.update(self.dispatcher.step_stats)  # the samplers' last reload time
        record.update(self.dispatcher.transport_metrics)  # rejected frames and messages, by kind
        record["samplers/live"] = float(len(self.dispatcher.live_samplers()))
        record["weight_sync/generation"] = float(self.publisher.generation)
        record["weight_sync/resyncs"] = float(self.publisher.resyncs)
        self.metrics.log(record)
        self._collect_evals()

    def finish(self) -> None:
        self.publisher.wait()
        deadline = time.monotonic() + self.config.pipeline.sampler_timeout_s
        while self.pending_evals and time.monotonic() < deadline:
            self._collect_evals(timeout_s=0.5)
        if self.pending_evals:
            log.error("evaluations of versions %s did not finish", sorted(self.pending_evals))

    def close(self, publish_wait_s: float | None = None) -> bool:
        """Stop the publisher (waiting at most `publish_wait_s` for a broadcast in flight) and the dispatcher,
        close the files; False if the publisher thread was still busy."""
        done = self.publisher.close(publish_wait_s)
        self.dispatcher.stop("training finished")
        self.metrics.close()
        self.ledger.close()
        return done
