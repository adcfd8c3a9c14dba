"""Readers of the files a run rewrites survive the rewrite: the launcher's progress bar, the metrics reader behind
the final report and the plots. A resumed learner rewrites metrics.jsonl once (speed_async.learner.checkpoint.
mark_rolled_back: the lines after its checkpoint get `"rolled_back": true`, so they grow, and a new file is
renamed over the old one), then appends; a reader holding a byte offset into the old file must not land
mid-line in the new one (that killed `speed-async train --resume` with `Expecting value: line 1 column 1`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.progress import Progress
from launcher.report import final_report
from speed_async.config import load_config
from speed_async.metrics import read_metrics


def _step(step: int) -> dict:
    return {"step": step, "policy_version": step + 1, "time/step": 1.0, "time/wall": 2.0 * (step + 1)}


def _write(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _roll_back(path: Path, keep: int) -> None:
    """What a resume does to metrics.jsonl: the first `keep` lines stay, later ones are marked (a torn one is
    dropped); a new file renamed over the old one."""
    lines = path.read_text().splitlines()
    marked = []
    for line in lines[keep:]:
        with contextlib.suppress(json.JSONDecodeError):
            marked.append(json.dumps({**json.loads(line), "rolled_back": True}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines[:keep] + marked))
    os.replace(tmp, path)


@pytest.fixture
def progress(tmp_path: Path) -> Iterator[Progress]:
    bar = Progress(tmp_path, load_config(None, ["trainer.total_steps=10"]))
    yield bar
    bar.close()


def test_the_progress_bar_survives_the_resume_rewrite(tmp_path: Path, progress: Progress) -> None:
    metrics = tmp_path / "metrics.jsonl"
    progress.update()  # no file yet
    _write(metrics, [_step(s) for s in range(5)], tail='{"step": 5, "time/st')  # the last line half-written
    progress.update()
    assert progress.steps == 5 and progress.bar.n == 5
    _write(metrics, [_step(s) for s in range(6)])  # the line completed
    progress.update()
    assert progress.steps == 6
    _roll_back(metrics, keep=4)  # killed after step 5; the checkpoint was after step 3
    progress.update()
    assert progress.steps == 4 and progress.bar.n == 4, "rolled-back records are not progress"
    with metrics.open("a") as f:  # the resumed learner appends
        f.write("".join(json.dumps(_step(s)) + "\n" for s in range(4, 7)))
    progress.update()
    assert progress.steps == 7 and progress.unreadable == 0


def test_a_shorter_file_or_a_garbage_line_does_not_stop_the_bar(tmp_path: Path, progress: Progress) -> None:
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, [_step(s) for s in range(4)])
    progress.update()
    with metrics.open("r+") as f:  # rewritten in place, shorter (not what the learner does; still survived)
        f.truncate(0)
        f.write(json.dumps(_step(0)) + "\n" + "not json\n")
    progress.update()
    assert progress.steps == 1 and progress.unreadable == 1


def test_read_metrics_leaves_the_line_being_written_and_names_a_damaged_one(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    records = [_step(0), {"step": 0, "time/wall": 3.0, "eval/arith/acc": 0.5}, _step(1)]
    _write(metrics, records, tail='{"step": 2, "ti')
    assert read_metrics(tmp_path) == records
    _roll_back(metrics, keep=2)
    assert read_metrics(tmp_path) == records[:2]
    assert len(read_metrics(tmp_path, include_rolled_back=True)) == 3
    assert "eval/arith/acc: 0.500 (step 0) -> 0.500 (step 0)" in final_report(tmp_path)
    _write(metrics, [_step(0)], tail='{"step": 1, "ti\n' + json.dumps(_step(1)) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record .* remove or repair that line"):
        read_metrics(tmp_path)
    _write(metrics, [_step(0)], tail="[1, 2]\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON object"):
        read_metrics(tmp_path)


def test_the_final_report_says_where_the_step_time_went(tmp_path: Path) -> None:
    split = {"step/learner/forward": 0.25, "step/learner/wait_batch": 0.75, "step/sampler0/generating": 1.0}
    _write(tmp_path / "metrics.jsonl", [{**_step(s), **split} for s in range(4)])
    report = final_report(tmp_path)
    assert "RL steps: 4 in 8 s; where the step time went:" in report
    assert "learner: wait_batch 75%, forward 25% of 4 s" in report
    assert "sampler0: generating 100% of 4 s" in report
