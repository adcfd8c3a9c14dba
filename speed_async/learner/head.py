"""Learner rank 0's extra duties beside training: the orchestrator (dispatcher thread), the weight publisher,
evaluation and metrics; the one place where the learner calls into the orchestrator.

```
  train loop (speed_async.learner.main) ──next_batch(step)──► Head ──► Dispatcher (orchestrator thread)
                                        ──publish(v, state)─►      ──► WeightPublisher (thread) ─► samplers
                                        ──log_step(record)──►      ──► metrics.jsonl, wandb
```
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from speed_async.accounting import step_split
from speed_async.config import Config
from speed_async.curriculum.train_group import TrainGroup
from speed_async.data.prepare import Prompt
from speed_async.learner.checkpoint import HeadState, effective, mark_rolled_back
from speed_async.learner.publisher import PublishError
from speed_async.orchestrator.dispatcher import DispatcherError

__all__ = [
    "ENDPOINTS_FILE",
    "STOP_FILE",
    "DispatcherError",
    "Head",
    "PublishError",
    "advertised_host",
    "resolve_device",
]

log = logging.getLogger("speed_async.learner")
ENDPOINTS_FILE = "endpoints.json"
STOP_FILE = "stop_request"
"""A file the launcher writes into the run directory to make the learner checkpoint and stop (its text: why)."""


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


class Head:
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
        from speed_async.learner.publisher import WeightPublisher
        from speed_async.metrics import MetricsLogger
        from speed_async.orchestrator.dispatcher import Dispatcher
        from speed_async.orchestrator.ledger import Ledger
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
        self.sampler_times: dict[int, np.ndarray] = {}  # at the previous step record

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

    def log_step(self, record: dict[str, float], parts: dict[str, float]) -> None:
        """Write the step's record: its metrics, the learner's `parts` of it and the samplers' time beside them
        (speed_async.accounting), the dispatcher's and publisher's gauges; then collect finished evaluations."""
        sampler_times = self.dispatcher.sampler_times
        record.update(step_split(record["time/step"], parts, sampler_times, self.sampler_times))
        self.sampler_times = sampler_times
        record["time/wall"] = time.time() - self.t_start
        record["weight_sync/seconds"] = self.publisher.last_seconds
        record["weight_sync/gbps"] = self.publisher.last_gbps
        record.update(self.dispatcher.state.metrics())
        record.update(self.dispatcher.source_metrics())
        record.update(self.dispatcher.step_stats)  # the samplers' last reload time
        record.update(self.dispatcher.transport_metrics)  # rejected frames and messages, by kind
        record["samplers/live"] = float(len(self.dispatcher.live_samplers()))
        for name in ("responses", "responses_spanning_versions"):  # of the groups received so far
            record[f"rollout/{name}"] = float(self.dispatcher.counters[name])
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
