"""`speed-async train` end to end on CPU: real torchrun learner (FSDP2, gloo), real vLLM sampler, real ZeroMQ.

Checked through the run directory, as a user would: the staleness bound holds for every trained group
(ledger `lag` and metrics), versions advance by one per RL step, SPEED groups have n + n_continue responses
with pass rates strictly inside (0, 1), and every dispatched prompt has a fate in the ledger.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from speed_async.learner.ledger import read_ledger
from speed_async.metrics import read_metrics
from tests.e2e.harness import REPO, role_env

pytestmark = pytest.mark.e2e

STEPS = 4
BATCH = 4


def _train(run_dir: Path, model: Path, *overrides: str) -> list[dict]:
    argv = [
        sys.executable, "-m", "speed_async", "train", "--config", str(REPO / "configs" / "tiny-cpu.toml"),
        f"model.path={model}", f"trainer.run_dir={run_dir}", f"trainer.total_steps={STEPS}",
        f"data.train_batch_size={BATCH}", f"algorithm.mini_batch_size={BATCH // 2}", "rollout.n=4",
        "rollout.n_continue=4", "rollout.gen_batch_size=8", "rollout.max_response_length=48",
        "rollout.enforce_eager=true", "trainer.eval_every=2", "trainer.eval_max_prompts=16", "trainer.eval_n=2",
        "logging.progress=false", "logging.wandb_mode=disabled", *overrides,
    ]  # fmt: skip
    result = subprocess.run(argv, env=role_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"train failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return read_metrics(run_dir)


def _check_run(run_dir: Path, k: int) -> None:
    records = read_metrics(run_dir)
    steps = [r for r in records if "time/step" in r]
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert [r["policy_version"] for r in steps] == list(range(1, STEPS + 1)), "one version per RL step"
    for r in steps:
        assert 0 <= r["staleness/max"] <= k
        assert r["train/group_size_min"] == r["train/group_size_max"] == 8
        assert r["train/pass_rate_min"] > 0 and r["train/pass_rate_max"] < 1
    evals = [r for r in records if any(key.startswith("eval/") for key in r)]
    assert {r["step"] for r in evals} == {0, 2, 4}, "evaluations at versions 0, 2 and the last"

    ledger = list(read_ledger(run_dir))
    trained = [e for e in ledger if e["event"] == "trained"]
    assert len(trained) == STEPS * BATCH
    assert Counter(e["step"] for e in trained) == {s: BATCH for s in range(STEPS)}
    assert all(0 <= e["lag"] <= k for e in trained), "no group beyond the staleness bound is ever trained"
    keys = Counter((e["epoch"], e["prompt_id"]) for e in trained)
    assert max(keys.values()) == 1, "a prompt is trained at most once per epoch"
    qualified = {(e["epoch"], e["prompt_id"]) for e in ledger if e["event"] == "qualified"}
    assert set(keys) <= qualified, "only prompts that qualified in screening are trained"
    dispatched = {(e["epoch"], e["prompt_id"]) for e in ledger if e["event"] == "dispatched"}
    assert set(keys) <= dispatched
    config = json.loads((run_dir / "resolved_config.json").read_text())
    assert config["pipeline"]["max_staleness"] == k
    assert (run_dir / "final_model" / "config.json").exists()


def test_synchronous_train_k0_trains_only_on_the_current_version(tmp_path: Path, tiny_model_dir: Path) -> None:
    # k = 0 here; k = 1 runs in test_resume and the soak (test_faults), k = 2 in test_multinode, each checking
    # the ledger's lags against its bound.
    _train(tmp_path / "run", tiny_model_dir, "pipeline.max_staleness=0")
    _check_run(tmp_path / "run", 0)
