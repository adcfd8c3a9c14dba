"""Role entry points, one per process: `python -m launcher.roles learner|sampler --run-dir DIR ...`.

The learner role runs under torchrun (every rank); samplers are plain processes. Both read the run's
resolved config, so every process of a run uses the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from speed_async.config import Config, config_from_dict

ENDPOINTS_FILE = "endpoints.json"
EXIT_LEARNER_UNRESPONSIVE = 3
"""Exit status of a sampler that found the learner unresponsive: the launcher stops the run instead of
restarting the sampler."""


def _config(run_dir: Path) -> Config:
    path = run_dir / "resolved_config.json"
    return config_from_dict(json.loads(path.read_text()), origin=str(path))


def wait_for_endpoints(run_dir: Path, timeout_s: float) -> dict:
    """The learner's socket endpoints, written by learner rank 0 once it has bound them."""
    path = run_dir / ENDPOINTS_FILE
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the learner did not publish its endpoints ({path}) within {timeout_s:.0f} s")
        time.sleep(0.1)
    return json.loads(path.read_text())


def _pin_cpus(cores: str | None) -> None:
    if cores:
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})


def main(argv: list[str] | None = None) -> int:
    """Parse the role's command line and run it."""
    parser = argparse.ArgumentParser(prog="launcher.roles")
    parser.add_argument("role", choices=["learner", "sampler"])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--sampler-id", type=int, default=0)
    parser.add_argument("--cpus", default=None, help="comma-separated CPU cores to pin this process to")
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
    )


def run_sampler(
    config: Config, run_dir: Path, model: str, sampler_id: int, endpoints: dict | Callable[[], dict]
) -> int:
    """Run sampler `sampler_id` against the learner's `endpoints` until the learner stops it; its time
    budget goes to run_dir/sampler-<id>.json. Returns 0, or EXIT_LEARNER_UNRESPONSIVE (3) after logging what
    it waited for when the learner stopped answering."""
    from speed_async.sampler.loop import LearnerUnresponsive, SamplerEndpoints, SamplerLoop
    from speed_async.transport import load_shared_key

    device = config.cluster.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    def resolve() -> SamplerEndpoints:
        found = endpoints() if callable(endpoints) else endpoints
        return SamplerEndpoints(work=found["work"], results=found["results"])

    loop = SamplerLoop(
        config,
        sampler_id,
        resolve,
        model,
        key=load_shared_key(config.cluster.shared_key_file or None),
        device=device,
    )
    log = logging.getLogger("speed_async.sampler")
    try:
        reason = loop.run()
        log.info("stopping: %s; stats %s", reason, loop.stats)
        (run_dir / f"sampler-{sampler_id}.json").write_text(json.dumps(loop.stats))
    except LearnerUnresponsive as err:
        log.error("%s", err)
        return EXIT_LEARNER_UNRESPONSIVE
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
