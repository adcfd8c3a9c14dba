"""Reward functions by import path, end to end: a user's function in a temporary module scores a real run.

`speed-async train` on CPU (torchrun learner, vLLM sampler, reward worker processes) with
`reward.functions.arithmetic=user_reward:score`: the function runs in the reward workers (it records the pid of
every process that calls it), its extra metric and the per-source counters reach metrics.jsonl, and the
responses on which it raises, returns NaN or a string, or sleeps past pipeline.reward_timeout_s score 0 and are
counted, without stopping the run. A path that does not resolve is refused by name before anything starts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from speed_async.metrics import read_metrics
from tests.e2e.harness import REPO, log_tail, role_env

pytestmark = pytest.mark.e2e

STEPS = 5  # at least 160 trained responses: both timeouts (calls 41 and 101) fall well before the last record
BATCH = 4
USER_MODULE = '''
"""A user's reward function: exact boxed answer, plus failures on purpose, by the number of earlier calls."""
import os, re, time

def score(response, ground_truth, extra):
    # Which call this is, over every worker: one fixed-width line appended atomically, its end's offset counts the
    # calls (reading the count, then appending, let two workers take the same number and skip the next).
    fd = os.open(os.environ["USER_REWARD_PIDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{os.getpid():>10}\\n".encode())
    calls = os.lseek(fd, 0, os.SEEK_CUR) // 11 - 1
    os.close(fd)
    if calls in (41, 101):
        time.sleep(30)  # past pipeline.reward_timeout_s: the worker is killed and replaced
    if calls % 20 == 5:
        raise RuntimeError("user reward failed on purpose")
    if calls % 20 == 10:
        return float("nan")
    if calls % 20 == 15:
        return "not a number"
    found = re.findall(r"\\\\boxed\\{([^{}]*)\\}", response)
    correct = bool(found) and found[-1].strip() == ground_truth
    return {"score": float(correct), "boxed": float(bool(found)), "level": float(extra["level"])}
'''


def _train(tmp_path: Path, model: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "speed_async", "train", "--config", str(REPO / "configs" / "tiny-cpu.toml"),
        f"model.path={model}", f"trainer.run_dir={tmp_path / 'run'}", f"trainer.total_steps={STEPS}",
        f"data.train_batch_size={BATCH}", f"algorithm.mini_batch_size={BATCH}", "rollout.n=4",
        "rollout.n_continue=4", "rollout.gen_batch_size=8", "rollout.max_response_length=48",
        "rollout.enforce_eager=true", "trainer.eval_every=0", "pipeline.reward_timeout_s=1",
        "pipeline.reward_workers=2", "logging.progress=false", "logging.wandb_mode=disabled", *overrides,
    ]  # fmt: skip
    env = {**role_env(), "PYTHONPATH": f"{REPO}:{tmp_path}", "USER_REWARD_PIDS": str(tmp_path / "pids.txt")}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.timeout(1800)  # a replacement worker after each timeout starts afresh (Math-Verify's import)
def test_a_user_function_scores_a_real_run_and_its_failures_are_counted(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "user_reward.py").write_text(USER_MODULE)
    result = _train(tmp_path, tiny_model_dir, "reward.functions.arithmetic=user_reward:score")
    run_dir = tmp_path / "run"
    sampler_log = run_dir / "logs" / "sampler-0.log"
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{log_tail(sampler_log)}"

    # Called in the reward workers: processes other than the launcher, the learner and the sampler.
    callers = {int(p) for p in (tmp_path / "pids.txt").read_text().split()}
    roles = set(json.loads((run_dir / "pids.json").read_text()).values())
    assert callers and not callers & roles, (callers, roles)

    steps = [r for r in read_metrics(run_dir) if "time/step" in r]
    assert [r["step"] for r in steps] == list(range(STEPS)), "the run went on through every failure"
    last = steps[-1]
    for record in steps:  # per-source fields in every step record
        assert 0 <= record["source/arithmetic/accept_rate"] <= 1 and record["source/arithmetic/screened"] > 0
        assert record["source/arithmetic/groups"] == BATCH and 0 < record["source/arithmetic/reward_mean"] < 1
    responses = last["reward/arithmetic/responses"]
    failed = {kind: last[f"reward/arithmetic/failed/{kind}"] for kind in ("error", "invalid", "timeout")}
    # Calls 5, 25, 45, ... raise, 10, 30, ... return NaN, 15, 35, ... a string; calls 41 and 101 sleep. The counts
    # trail the scoring by up to a second (the sampler sends them every second), so the last record can miss the
    # last few responses (103 of 3 x 4 x 8 trained in a 3-step run in CI-like conditions: too few to reach call 101).
    assert responses >= 110, responses
    assert failed["error"] >= responses // 20 - 2 and failed["invalid"] >= 2 * (responses // 20) - 3, failed
    # Calls 41 and 101 time out by design; on a loaded 2-core machine an ordinary call can also pass the 1-s limit
    # (3 timeouts in one full `make test`), which is counted the same way.
    assert failed["timeout"] >= 2, failed
    assert last["reward/arithmetic/failed"] == sum(failed.values()) < responses / 4
    # The function's extra metrics reach metrics.jsonl per source (means over the responses that returned them).
    boxed = [r["reward/arithmetic/boxed"] for r in steps if r.get("reward/arithmetic/boxed") is not None]
    levels = [r["reward/arithmetic/level"] for r in steps if r.get("reward/arithmetic/level") is not None]
    assert boxed and all(0 < b <= 1 for b in boxed) and levels and all(1 <= v <= 5 for v in levels)
    # The first failure of each kind is logged with its traceback; the rest are only counted.
    log = sampler_log.read_text()
    assert log.count("user_reward:score raised for data source 'arithmetic'") == 1, log_tail(sampler_log)
    assert "RuntimeError: user reward failed on purpose" in log
    assert log.count("user_reward:score ran past timeout_s=1.0 for data source 'arithmetic'") == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.functions.arithmetic=no_such_module_xyz:score", r"module 'no_such_module_xyz' cannot be imported"),
        ("reward.functions.arithmetic=user_reward:missing", r"module 'user_reward' has no attribute 'missing'"),
        ("reward.functions.arithmatic=user_reward:score", r"no data source 'arithmatic' in the run"),
    ],
)
def test_a_path_that_does_not_resolve_is_refused_by_name(
    tmp_path: Path, tiny_model_dir: Path, override: str, message: str
) -> None:
    (tmp_path / "user_reward.py").write_text(USER_MODULE)
    result = _train(tmp_path, tiny_model_dir, override)
    key, _, path = override.partition("=")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"speed-async train: error: {key} = '{path}' is invalid: " in result.stderr
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "run" / "logs").exists(), "no process was started"
    assert not (tmp_path / "pids.txt").exists()
