"""The continuous sampler's bookkeeping, without an engine: the request book and the activity clock."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from speed_async.accounting import LEARNER_PARTS, format_summary, step_split, summarize
from speed_async.curriculum.groups import PromptWork, Response
from speed_async.protocol import SAMPLER_ACTIVITIES
from speed_async.sampler.activity import ActivityClock
from speed_async.sampler.inflight import RequestBook


def _work(prompt_id: int) -> PromptWork:
    return PromptWork(
        prompt_id=prompt_id,
        epoch=0,
        data_source="t",
        prompt_token_ids=np.array([1, 2], dtype=np.int32),
        ground_truth="3",
        num_screen=2,
        num_continue=3,
    )


def _response(version_min: int, version_max: int) -> Response:
    return Response(
        token_ids=np.array([5], dtype=np.int32),
        logprobs=np.array([-0.5], dtype=np.float32),
        finish_reason="stop",
        score=1.0,
        reward=1.0,
        version_min=version_min,
        version_max=version_max,
    )


def test_a_stage_completes_when_every_sample_is_scored_in_any_order() -> None:
    book = RequestBook()
    ids = book.open(_work(7), 2, version=3)
    assert len(set(ids)) == 2 and book.in_flight() == (2, 0)
    stage, index, version = book.finish(ids[1])
    assert (index, version, stage.scoring) == (1, 3, 1)
    assert not book.add_response(stage, 1, _response(3, 4))
    found = book.finish(ids[0])
    assert found is not None and found[0] is stage and book.in_flight() == (0, 0)
    assert book.add_response(stage, 0, _response(3, 3))  # complete: it leaves the book
    assert [r.version_max for r in stage.ordered_responses()] == [3, 4]
    assert list(book.stages()) == []


def test_engine_time_is_shared_among_the_requests_in_flight() -> None:
    # Step 1 (1 s): a train stage of 2 and an eval stage of 2 run, 0.25 s each. The eval requests finish.
    # Step 2 (1 s): only the train requests remain, 0.5 s each. The eval stage took 2 x 0.25 = 0.5 s.
    book = RequestBook()
    train = book.open(_work(1), 2, version=0)
    evals = book.open(_work(2), 2, version=0, eval_version=0)
    assert book.in_flight() == (2, 2)
    book.charge(1.0)
    eval_stage = None
    for rid in evals:
        eval_stage, _, _ = book.finish(rid)
    book.charge(1.0)
    train_stage, _, _ = book.finish(train[0])
    assert eval_stage.engine_s == pytest.approx(0.5)
    assert train_stage.engine_s == pytest.approx(0.75)  # 0.25 + 0.5 for this one request


def test_aborted_stages_leave_the_book_and_late_results_are_ignored() -> None:
    book = RequestBook()
    old = book.open(_work(1), 2, version=0)
    keep = book.open(_work(2), 2, version=2)
    stage, index, _ = book.finish(old[0])  # scored later, after the abort
    stages, ids = book.abort(lambda s: s.first_version < 1)
    assert [s.work.prompt_id for s in stages] == [1] and ids == [old[1]]
    assert book.finish(old[1]) is None  # the engine no longer runs it
    assert not book.add_response(stage, index, _response(0, 0))  # its score arrives: ignored
    assert [s.work.prompt_id for s in book.stages()] == [2]
    assert sorted(book.clear()) == sorted(keep)


def test_the_counts_the_loop_reads_every_step_follow_open_finish_abort_and_clear() -> None:
    """in_flight and screening are counted as stages come and go (the loop reads them every engine step)."""
    book = RequestBook()
    screen = book.open(_work(1), 2, version=0)
    evals = book.open(_work(2), 3, version=0, eval_version=0)
    book.open(replace(_work(3), stage="continue"), 3, version=0)
    assert (book.in_flight(), book.screening) == ((5, 3), 1)
    book.finish(evals[0])
    assert book.in_flight() == (5, 2)
    book.abort(lambda s: s.work.prompt_id == 3)  # training stages only, as the loop aborts them
    assert (book.in_flight(), book.screening) == ((2, 2), 1)
    for rid in screen:
        found = book.finish(rid)
    for i in range(2):
        book.add_response(found[0], i, _response(0, 0))  # the screen completes: it is no longer screening
    assert (book.in_flight(), book.screening) == ((0, 2), 0)
    book.abort(lambda s: s.is_eval)
    assert book.in_flight() == (0, 0)
    book.open(_work(4), 2, version=1)
    book.open(_work(5), 1, version=1, eval_version=1)
    assert len(book.clear()) == 3 and (book.in_flight(), book.screening) == ((0, 0), 0)


def test_activity_clock_charges_each_interval_to_what_the_loop_did() -> None:
    clock = ActivityClock("idle_work")
    time.sleep(0.02)
    assert clock.switch("generating") >= 0.02
    time.sleep(0.03)
    clock.split({"generating": 3, "evaluating": 1})  # 3/4 and 1/4 of the 30 ms
    totals = clock.totals()
    assert set(totals) == set(SAMPLER_ACTIVITIES) and clock.current == "generating"
    assert totals["idle_work"] >= 0.02
    assert totals["evaluating"] == pytest.approx(totals["generating"] / 3, rel=0.2)
    snap = clock.snapshot()
    assert snap.dtype == np.float64 and snap.sum() == pytest.approx(sum(clock.totals().values()), abs=0.01)


def test_step_split_adds_up_to_the_step_and_scales_each_sampler_to_it() -> None:
    n = len(SAMPLER_ACTIVITIES)
    before = {0: np.zeros(n)}
    now = {0: np.array([2.0, 0, 1.0, 0, 0, 0, 1.0])[:n], 1: np.full(n, 0.5)}  # sampler 1 is new
    out = step_split(8.0, {"wait_batch": 3.0, "forward": 1.0, "backward": 2.0}, now, before)
    learner = [out[f"step/learner/{p}"] for p in LEARNER_PARTS] + [out["step/learner/other"]]
    assert sum(learner) == pytest.approx(8.0) and out["step/learner/other"] == pytest.approx(2.0)
    # Sampler 0 covered 4 s of its own clock: generating half of it, i.e. 4 s of the 8-s step.
    assert out["step/sampler0/generating"] == pytest.approx(4.0)
    assert out["step/sampler0/covered_s"] == pytest.approx(4.0)
    assert sum(out[f"step/sampler1/{a}"] for a in SAMPLER_ACTIVITIES) == pytest.approx(8.0)
    totals = summarize([out, out])
    assert totals["learner"]["wait_batch"] == pytest.approx(6.0)
    assert sum(totals["sampler0"].values()) == pytest.approx(16.0)
    lines = format_summary(totals)
    assert lines[0].startswith("  learner: wait_batch 38%") and "sampler0: generating 50%" in lines[1]
