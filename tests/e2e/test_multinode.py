"""Two nodes simulated on this machine: two torchrun invocations (`--nnodes 2`, c10d rendezvous on loopback),
each running `speed-async train`; worker roles come from the global rank (rank 0 learns, rank 1 samples).

Each "node" is pinned to its own core, as two machines would be. Checked through the run directory: the
run trains every step within the staleness bound and the ledger accounts for every trained prompt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from launcher.train import free_port
from speed_async.metrics import read_metrics
from speed_async.orchestrator.ledger import read_ledger
from tests.e2e.harness import REPO, role_env

pytestmark = pytest.mark.e2e

STEPS = 3
BATCH = 4
K = 2  # the only end-to-end run at k = 2 (test_train runs k = 0, test_resume and test_faults k = 1)


def _node(node_rank: int, port: int, run_dir: Path, model: Path, log: Path) -> subprocess.Popen[bytes]:
    cores = sorted(os.sched_getaffinity(0))
    core = str(cores[node_rank % len(cores)])
    argv = [
        "taskset", "-c", core, sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-node-test",
        f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}", "--max-restarts=0",
        "-m", "speed_async", "train", "--config", str(REPO / "configs" / "tiny-cpu.toml"),
        f"model.path={model}", f"trainer.run_dir={run_dir}", f"trainer.total_steps={STEPS}",
        f"data.train_batch_size={BATCH}", f"algorithm.mini_batch_size={BATCH}", "rollout.n=4",
        "rollout.n_continue=4", "rollout.gen_batch_size=8", "rollout.max_response_length=48",
        "rollout.enforce_eager=true", "trainer.eval_every=0", f"pipeline.max_staleness={K}",
        "pipeline.sync_timeout_s=300", "logging.progress=false", "logging.wandb_mode=disabled",
    ]  # fmt: skip
    env = role_env()
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_two_simulated_nodes_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "run"
    port = free_port()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [_node(i, port, run_dir, tiny_model_dir, logs[i]) for i in range(2)]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
                node.wait()
    text = "\n".join(f"--- node {i}\n{log.read_text(errors='replace')[-4000:]}" for i, log in enumerate(logs))
    assert codes == [0, 0], f"torchrun exit codes {codes}\n{text}"

    steps = [r for r in read_metrics(run_dir) if "time/step" in r]
    assert [r["policy_version"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["staleness/max"] <= K for r in steps)
    trained = [e for e in read_ledger(run_dir) if e["event"] == "trained"]
    assert Counter(e["step"] for e in trained) == {s: BATCH for s in range(STEPS)}
    assert all(0 <= e["lag"] <= K for e in trained), "no group beyond the staleness bound is ever trained"
    assert max(Counter((e["epoch"], e["prompt_id"]) for e in trained).values()) == 1
    assert (run_dir / "sampler-0.json").exists(), "the sampler (global rank 1) ran and reported its time budget"
    assert "sampler[0] (rank 1)" in text and "learner[0] (rank 0)" in text, "roles taken from the global rank"
    assert (run_dir / "final_model" / "config.json").exists()
