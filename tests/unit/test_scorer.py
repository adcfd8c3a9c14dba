"""The sampler's scorer: its reward host process decodes and scores off the engine's process and core."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from speed_async.config import load_config
from speed_async.sampler.scoring import Scorer

pytestmark = pytest.mark.timeout(180)


def _finished(tokenizer_dir: Path, texts: list[str], truth: str, *, is_eval: bool = False) -> list[tuple]:
    """(stage, index, completion, version_min, version_max) for each text, as the engine hands them over."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stage = SimpleNamespace(work=SimpleNamespace(ground_truth=truth, data_source="arithmetic", extra="{}"),
                            is_eval=is_eval)  # fmt: skip
    out = []
    for i, text in enumerate(texts):
        ids = np.array(tokenizer.encode(text), np.int32)
        out.append((stage, i, SimpleNamespace(token_ids=ids, logprobs=np.zeros(len(ids)), finish_reason="stop"), 3, 4))
    return out


def _collect(scorer: Scorer, count: int) -> list:
    got, deadline = [], time.monotonic() + 60
    while len(got) < count and time.monotonic() < deadline:
        got += scorer.collect(0.5)
    return got


def test_the_host_decodes_and_scores_each_sample_and_counts_training_samples_only(tiny_model_dir: Path) -> None:
    config = load_config(None, ["pipeline.reward_workers=1"])
    scorer = Scorer(config, str(tiny_model_dir))
    try:
        scorer.submit(_finished(tiny_model_dir, ["so \\boxed{12}", "\\boxed{13}", "12"], "12"))
        scorer.submit(_finished(tiny_model_dir, ["\\boxed{7}"], "7", is_eval=True))
        assert scorer.pending == 4
        got = _collect(scorer, 4)
        scores = {(stage.is_eval, index): (r.score, r.reward, r.version_min, r.version_max) for stage, index, r in got}
        assert scores[(False, 0)] == (1.0, 1.0, 3, 4)
        assert scores[(False, 1)][0] == 0.0
        assert scores[(True, 0)][0] == 1.0
        assert scorer.pending == 0
        stats = scorer.take_stats()
        assert stats["arithmetic"].responses == 3  # the evaluation sample is not counted
        assert stats["arithmetic"].score_sum == scores[(False, 0)][0] + scores[(False, 1)][0] + scores[(False, 2)][0]
        assert scorer.take_stats() == {}
    finally:
        scorer.close()
    assert not scorer.process.is_alive()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_host_runs_on_the_cores_it_is_given(tiny_model_dir: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    config = load_config(None, ["pipeline.reward_workers=1"])
    scorer = Scorer(config, str(tiny_model_dir), cpus=set(cores), host_cpus={cores[0]})
    try:
        scorer.collect(0.0)  # waits until the host is ready (it pins itself first)
        assert os.sched_getaffinity(scorer.process.pid) == {cores[0]}
        assert os.sched_getaffinity(0) == set(cores)  # the caller's own cores are left as they were
    finally:
        scorer.close()


def test_a_host_that_cannot_be_pinned_says_so_and_keeps_scoring(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(None, ["pipeline.reward_workers=1"])
    scorer = Scorer(config, str(tiny_model_dir), host_cpus={4095})  # no such core: sched_setaffinity fails
    try:
        scorer.submit(_finished(tiny_model_dir, ["\\boxed{5}"], "5"))
        assert "the reward host process stays on its cores: pinning it to {4095} failed" in caplog.text
        assert [r.score for _, _, r in _collect(scorer, 1)] == [1.0]
    finally:
        scorer.close()


def test_a_host_that_dies_is_named_by_the_next_collect(tiny_model_dir: Path) -> None:
    config = load_config(None, ["pipeline.reward_workers=1"])
    scorer = Scorer(config, str(tiny_model_dir))
    try:
        scorer.collect(0.0)
        os.kill(scorer.process.pid, signal.SIGKILL)
        scorer.process.join(timeout=10)
        with pytest.raises(RuntimeError, match=rf"the reward host \(pid {scorer.process.pid}\) is gone: exit code -9"):
            scorer.collect(0.1)
    finally:
        scorer.close()


def test_a_sampler_that_exits_without_close_stops_its_host(tiny_model_dir: Path, tmp_path: Path) -> None:
    """multiprocessing joins non-daemon children at exit: the scorer's finalizer must stop the host first."""
    script = tmp_path / "exit_without_close.py"
    script.write_text(
        "import sys\n"
        "from speed_async.config import load_config\n"
        "from speed_async.sampler.scoring import Scorer\n"
        "if __name__ == '__main__':\n"
        f"    scorer = Scorer(load_config(None, ['pipeline.reward_workers=1']), {str(tiny_model_dir)!r})\n"
        "    scorer.collect(0.0)\n"
        "    print(scorer.process.pid, flush=True)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    host = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{host}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{host}").exists(), f"the reward host {host} outlived its sampler"
