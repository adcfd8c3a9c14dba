"""Tests of speed_async.rewards: Math-Verify scoring, the time-limited worker pool, the overlong penalty."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from speed_async.rewards import (
    InvalidReward,
    RewardItem,
    RewardPool,
    WorkerStartupError,
    check_functions,
    check_result,
    math_reward,
    overlong_penalty,
    score_batch,
)
from speed_async.rewards import pool as rewards_pool
from tests.unit import _slow_scorer

REPO_ROOT = Path(__file__).resolve().parents[2]
SLOW_SCORER = "tests.unit._slow_scorer:score"

# (response, ground truth, score): the real behaviour of math-verify 0.9 with VeRL's settings.
MATH_CASES = [
    (r"The final answer is \boxed{42}.", "42", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    # No \boxed: ExprExtractionConfig takes the number after the "answer is" anchor...
    ("The answer is 42", "42", 1.0),
    # ...the anchored one, not the last number in the text.
    ("The answer is 43 and 42", "42", 0.0),
    (r"\boxed{41}", "42", 0.0),
    ("", "42", 0.0),
    # Gold "\boxed{}" has nothing to extract: math-verify raises ValueError, which scores 0.0.
    (r"\boxed{42}", "", 0.0),
]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's reaper may be slow to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until no process in ``pids`` is alive; return those still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def slow_pool() -> Iterator[RewardPool]:
    with RewardPool(num_workers=2, timeout_s=1.5, max_chars=10, score_fn=SLOW_SCORER) as pool:
        yield pool


# --- score_math -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_math_verify() -> None:
    """Math-Verify builds its parsers on the first call, which can take seconds on a loaded machine and then
    hit its own internal time limit (scoring 0.0); the reward workers warm up the same way before they report
    ready."""
    from speed_async.rewards.math_verify_reward import score_math

    score_math("\\boxed{1}", "1")


@pytest.mark.usefixtures("warm_math_verify")
@pytest.mark.parametrize(("response", "ground_truth", "expected"), MATH_CASES)
def test_score_math(response: str, ground_truth: str, expected: float) -> None:
    from speed_async.rewards.math_verify_reward import score_math

    assert score_math(response, ground_truth) == expected


def test_importing_rewards_pulls_no_torch_vllm_or_math_verify() -> None:
    code = (
        "import sys, speed_async.rewards; "
        "print(sorted(m for m in ('torch', 'vllm', 'math_verify', 'sympy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the default Math-Verify pool ----------------------------------------------------------------------


def test_default_pool_math_reward_and_score_batch_in_order() -> None:
    assert math_reward(r"\boxed{\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("The answer is 7", "8") == 0.0
    items = [(r, g) for r, g, _ in MATH_CASES] * 2
    assert score_batch(items) == [s for _, _, s in MATH_CASES] * 2
    assert score_batch([]) == []
    # A closed default pool (e.g. after an interrupted call) is replaced on the next call.
    first = rewards_pool._get_default_pool()
    first.close()
    assert math_reward(r"\boxed{42}", "42") == 1.0
    assert rewards_pool._get_default_pool() is not first


# --- RewardPool time limit, errors, lifecycle (test scorer) ------------------------------------------


def test_pool_kills_hung_worker_and_keeps_working(slow_pool: RewardPool) -> None:
    items = [("a", "a"), (_slow_scorer.HANG, "x"), ("b", "c"), ("d", "d"), ("e", "e"), ("f", "g")]
    pids_before = slow_pool.worker_pids()
    start = time.monotonic()
    scores = slow_pool.score_batch(items)
    elapsed = time.monotonic() - start
    assert scores == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert elapsed < slow_pool.timeout_s + 1.0, elapsed
    stats = slow_pool.stats()
    assert stats["timeouts"] == 1
    assert stats["worker_restarts"] == 1
    assert stats["scored"] == 5
    killed = set(pids_before) - set(slow_pool.worker_pids())
    assert len(killed) == 1
    assert _wait_gone(list(killed), 1.0) == []
    # The replacement (or the other worker) keeps scoring.
    assert slow_pool.score_batch([("x", "x"), ("y", "z"), ("w", "w")]) == [1.0, 0.0, 1.0]
    assert slow_pool.stats()["timeouts"] == 1


def test_submit_returns_at_once_and_poll_hands_back_scores_as_they_finish(slow_pool: RewardPool) -> None:
    # Two workers: the hung item holds one of them until the 1.5 s limit, the others finish on the second.
    start = time.monotonic()
    tickets = slow_pool.submit([(_slow_scorer.HANG, "x"), ("a", "a"), ("b", "c")])
    assert time.monotonic() - start < 0.5  # nothing was waited for
    assert slow_pool.num_unfinished == 3
    got: dict[int, float] = {}
    while len(got) < 2:
        got.update(slow_pool.poll(timeout_s=0.2))
    assert got == {tickets[1]: 1.0, tickets[2]: 0.0}  # before the hung one was given up
    assert time.monotonic() - start < slow_pool.timeout_s
    while tickets[0] not in got:
        got.update(slow_pool.poll(timeout_s=0.5))
    assert got[tickets[0]] == 0.0 and slow_pool.num_unfinished == 0
    assert slow_pool.poll() == {}
    # take() waits for its own tickets; other finished scores stay for poll().
    first, second = slow_pool.submit([("p", "p")]), slow_pool.submit([("q", "r"), ("s", "s")])
    assert slow_pool.take(second) == [0.0, 1.0]
    assert slow_pool.poll(timeout_s=1.0) == {first[0]: 1.0}


def test_wait_for_answer_returns_when_a_worker_answered_without_holding_the_lock(slow_pool: RewardPool) -> None:
    # A thread waits (up to 3 s) on the worker that hangs on HANG. Meanwhile submit and poll from this thread go
    # through at once: the lock is not held during the wait. (The hung item is given up at its 1.5 s deadline by
    # this thread's polls; the waiter then returns at its own timeout at the latest.)
    slow_pool.submit([(_slow_scorer.HANG, "x")])
    waiter = threading.Thread(target=slow_pool.wait_for_answer, args=(3.0,))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.1)
    (ticket,) = slow_pool.submit([("a", "a")])  # would block for the waiter's 3 s if it held the lock
    got: dict[int, float] = {}
    while ticket not in got:
        got.update(slow_pool.poll(timeout_s=0.2))
    assert got[ticket] == 1.0 and time.monotonic() - start < 1.0
    while slow_pool.num_unfinished:
        slow_pool.poll(timeout_s=0.5)
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    # With nothing to wait for, it returns after the timeout.
    start = time.monotonic()
    slow_pool.wait_for_answer(0.2)
    assert 0.15 < time.monotonic() - start < 1.0


def test_pool_too_long_boundary(slow_pool: RewardPool) -> None:
    # max_chars=10: 10 characters are scored, 11 are not.
    assert slow_pool.score_batch([("x" * 10, "x" * 10), ("x" * 11, "x" * 11)]) == [1.0, 0.0]
    assert slow_pool.stats()["too_long"] == 1
    assert slow_pool.stats()["scored"] == 1


def test_pool_counts_scorer_errors_and_worker_crashes(slow_pool: RewardPool) -> None:
    items = [("a", "a"), (_slow_scorer.RAISE, "x"), (_slow_scorer.CRASH, "x"), ("b", "b")]
    assert slow_pool.score_batch(items) == [1.0, 0.0, 0.0, 1.0]
    stats = slow_pool.stats()
    assert stats["errors"] == 2  # one raise, one crash
    assert stats["worker_restarts"] == 1  # only the crash needs a new worker
    assert stats["timeouts"] == 0
    assert slow_pool.score_batch([("c", "c")]) == [1.0]


def test_pool_rejects_bad_items_and_use_after_close() -> None:
    pool = RewardPool(num_workers=1, score_fn=SLOW_SCORER)
    with pytest.raises(ValueError, match=r"items\[1\] must be a RewardItem or a \(response, ground_truth\) tuple"):
        pool.score_batch([("a", "a"), ("b", 1)])
    pids = pool.worker_pids()
    assert not pool.closed
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    assert _wait_gone(pids, 1.0) == []
    with pytest.raises(RuntimeError, match="after close"):
        pool.score_batch([("a", "a")])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_workers": 0}, "num_workers=0"),
        ({"timeout_s": 0.0}, "timeout_s=0.0"),
        ({"max_chars": 0}, "max_chars=0"),
        ({"startup_timeout_s": -1.0}, "startup_timeout_s=-1.0"),
        ({"score_fn": "tests.unit._slow_scorer"}, "score_fn='tests.unit._slow_scorer'"),
    ],
)
def test_pool_rejects_bad_settings(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} is invalid: allowed"):
        RewardPool(**kwargs)  # type: ignore[arg-type]


def test_pool_startup_error_names_worker() -> None:
    with pytest.raises(WorkerStartupError, match=r"reward worker 0 \(pid \d+\) could not load .*no_such_fn"):
        RewardPool(num_workers=1, score_fn="tests.unit._slow_scorer:no_such_fn")


def test_pool_startup_timeout_names_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_slow_scorer.IMPORT_DELAY_ENV, "30")
    start = time.monotonic()
    with pytest.raises(WorkerStartupError, match=r"reward worker \d \(pid \d+\) did not report ready within"):
        RewardPool(num_workers=2, score_fn=SLOW_SCORER, startup_timeout_s=0.5)
    assert time.monotonic() - start < 3.0


def test_pool_closes_when_replacement_worker_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = RewardPool(num_workers=1, score_fn=SLOW_SCORER)
    monkeypatch.setenv(_slow_scorer.IMPORT_FAIL_ENV, "1")  # inherited by the replacement only
    # The replacement starts in the background: the crash scores 0.0, the next call meets the failure.
    assert pool.score_batch([(_slow_scorer.CRASH, "x")]) == [0.0]
    with pytest.raises(WorkerStartupError, match=r"reward worker 0 \(pid \d+\) could not load .*IMPORT_FAIL"):
        pool.score_batch([("a", "a")])
    with pytest.raises(RuntimeError, match="after close"):
        pool.score_batch([("a", "a")])


def test_workers_exit_when_parent_dies(tmp_path: Path) -> None:
    # The parent hands one worker an item that hangs for 60 s, then SIGKILLs itself: the idle worker
    # exits on EOF, the busy one through its parent watchdog.
    code = f"""
import os, signal, threading, time
from speed_async.rewards import RewardPool
pool = RewardPool(num_workers=2, timeout_s=60.0, score_fn={SLOW_SCORER!r})
print(*pool.worker_pids(), flush=True)
threading.Thread(target=pool.score_batch, args=([({_slow_scorer.HANG!r}, "x")],), daemon=True).start()
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""
    # Workers inherit the parent's stdout/stderr: read only the first line and wait for the parent
    # itself, not for EOF on its pipes (which would also wait for the workers).
    with (
        (tmp_path / "stderr.txt").open("w") as stderr,
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
        ) as parent,
    ):
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert parent.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    assert len(pids) == 2
    still_alive = _wait_gone(pids, 3.0)
    for pid in still_alive:  # do not leak them if the test fails
        os.kill(pid, signal.SIGKILL)
    assert still_alive == []


# --- reward functions by import path -------------------------------------------------------------------

USER_FN = "tests.unit._slow_scorer:user_score"


def test_pool_routes_sources_to_their_functions_and_counts_failures_per_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = _slow_scorer
    u = lambda response, truth="a", counted=True: RewardItem(response, truth, "u", '{"k": 1, "j": 2}', counted)  # noqa: E731
    items = [
        u("a"),  # match: 1.0, extra_keys 2 (the row's extra reached the function)
        u("b"),  # no match: 0.0
        u(s.DICT),  # 0.5, length 4
        u(s.TRUE),  # a bool counts as a number: 1.0
        u(s.RAISE), u(s.RAISE),  # error (twice: logged once)
        u(s.NAN), u(s.INF), u(s.TEXT), u(s.NOSCORE), u(s.RESERVED),  # invalid
        u(s.HANG),  # timeout
        u(s.CRASH),  # the worker dies: error
        u("a", counted=False),  # scored, not counted
        RewardItem("x", "x", "other"),  # no function for "other": the default (2 arguments)
        ("y", "z"),  # a plain pair: the default, data source ""
    ]  # fmt: skip
    pool = RewardPool(num_workers=2, timeout_s=1.5, score_fn=SLOW_SCORER, functions={"u": USER_FN})
    with caplog.at_level("WARNING", logger="speed_async.rewards.pool"), pool:
        scores = pool.score_batch(items)
        stats = pool.take_source_stats()
        assert pool.take_source_stats() == {}  # taken: reset
        assert pool.stats()["invalid"] == 5 and pool.stats()["errors"] == 3 and pool.stats()["timeouts"] == 1
    assert scores == [1.0, 0.0, 0.5, 1.0] + [0.0] * 9 + [1.0, 1.0, 0.0]
    assert sorted(stats) == ["", "other", "u"]
    got = stats["u"]
    assert got.responses == 13 and got.score_sum == 2.5
    assert got.failed == {"error": 3, "invalid": 5, "timeout": 1}
    assert got.metric_sums == {"extra_keys": 4.0, "length": 4.0} and got.metric_counts == {"extra_keys": 2, "length": 1}
    assert (stats["other"].responses, stats["other"].score_sum) == (1, 1.0)
    # The first failure of each kind per source is logged (with the function's traceback), later ones only counted.
    warnings = [r.getMessage() for r in caplog.records]
    raised = [w for w in warnings if "raised for data source 'u'" in w]
    assert len(raised) == 1 and "Traceback" in raised[0] and "scorer failed on purpose" in raised[0]
    invalid = [w for w in warnings if "returned no valid result for data source 'u'" in w]
    assert len(invalid) == 1 and "not a finite number" in invalid[0]  # NAN or INF, whichever came back first
    assert len([w for w in warnings if "ran past timeout_s=1.5 for data source 'u'" in w]) == 1


def test_check_result() -> None:
    assert check_result(1) == (1.0, {}) and check_result(False) == (0.0, {})
    assert check_result({"score": 0.25, "format": 1}) == (0.25, {"format": 1.0})
    for value, message in [
        ("1", r"the result is a str"),
        (None, r"the result is a NoneType"),
        (float("-inf"), r"the result is -inf, not a finite number"),
        ({"format": 1.0}, r"no 'score'"),
        ({"score": 1.0, "responses": 1.0}, r"metric name 'responses' is not allowed"),
        ({"score": 1.0, "": 1.0}, r"metric name '' is not allowed"),
        ({"score": 1.0, "x": [1]}, r"metric 'x' is a list"),
    ]:
        with pytest.raises(InvalidReward, match=message):
            check_result(value)


@pytest.mark.parametrize(
    ("configured", "message"),
    [
        ({"u": "no_such_module_xyz:score"}, r"reward\.functions\.u = 'no_such_module_xyz:score' is invalid: module "
         r"'no_such_module_xyz' cannot be imported \(ModuleNotFoundError"),
        ({"u": "tests.unit._slow_scorer:missing"}, r"has no attribute 'missing'"),
        ({"u": "tests.unit._slow_scorer:NOT_CALLABLE"}, r"_slow_scorer:NOT_CALLABLE' is a int, not a function"),
        ({"typo": USER_FN}, r"reward\.functions\.typo = .* no data source 'typo' in the run \(sources: \['u'\]\)"),
    ],
)  # fmt: skip
def test_check_functions_names_what_does_not_resolve(configured: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_functions(configured, ["u"])


def test_check_functions_imports_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As the reward workers of `python -m` role processes do: the working directory is on the path.
    (tmp_path / "my_reward_mod.py").write_text("def score(response, ground_truth, extra):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    check_functions({"u": "my_reward_mod:score"}, ["u"])
    assert str(tmp_path) not in sys.path  # put back


# --- overlong_penalty -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 0.0),
        (2560, 0.0),  # = max - buffer = 3072 - 512: last length without penalty
        (2561, -1 / 512),  # -(2561 - 2560) / 512
        (2816, -0.5),  # -(2816 - 2560) / 512 = -256 / 512
        (3072, -1.0),  # -(3072 - 2560) / 512 = -512 / 512
    ],
)
def test_overlong_penalty_paper_settings(length: int, expected: float) -> None:
    assert overlong_penalty(length, max_response_length=3072, buffer=512) == expected


def test_overlong_penalty_buffer_equal_to_max() -> None:
    # max 4, buffer 4: the penalty starts at length 0: -(1 - 0) / 4 = -0.25, -(4 - 0) / 4 = -1.
    assert overlong_penalty(0, 4, 4) == 0.0
    assert overlong_penalty(1, 4, 4) == -0.25
    assert overlong_penalty(4, 4, 4) == -1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((3073, 3072, 512), "response_length=3073 is invalid"),
        ((-1, 3072, 512), "response_length=-1 is invalid"),
        ((100, 3072, 0), "buffer=0 is invalid"),
        ((100, 3072, -5), "buffer=-5 is invalid"),
        ((100, 3072, 3073), "buffer=3073 is invalid"),
    ],
)
def test_overlong_penalty_rejects_bad_arguments(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}: allowed"):
        overlong_penalty(*args)
