"""The embedded arithmetic task: determinism, disjoint splits, the ladder, and the target responses."""

from __future__ import annotations

import collections
import random
import re

import pytest

from speed_async.data.arithmetic import (
    DATA_SOURCE,
    HARD_LEVELS,
    LEVELS,
    SPLIT_SIZES,
    answer,
    load_split,
    parse_problem,
    problem_text,
    solution_text,
)
from speed_async.rewards.math_verify_reward import score_math


@pytest.fixture(scope="module")
def splits() -> dict[str, list]:
    return {split: load_split(split, seed=0) for split in SPLIT_SIZES}


def test_same_seed_same_records_other_seed_other_records(splits: dict[str, list]) -> None:
    assert load_split("test", seed=0) == splits["test"]
    other = load_split("test", seed=1)
    assert [r.prompt for r in other] != [r.prompt for r in splits["test"]]


def test_splits_have_their_sizes_levels_and_no_shared_text(splits: dict[str, list]) -> None:
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (20000, 500)
    train_text = {r.prompt for r in train}
    test_text = {r.prompt for r in test}
    assert len(train_text) == len(train) and len(test_text) == len(test)  # no duplicates inside a split
    assert not train_text & test_text
    # Test: 500 / 5 levels = 100 each. Train: weights 1:4:4:4:4 (sum 17): 20000 * 1 // 17 = 1176,
    # 20000 * 4 // 17 = 4705, and the last level takes the remainder 20000 - 1176 - 3 * 4705 = 4709.
    assert collections.Counter(r.extra["level"] for r in test) == {1: 100, 2: 100, 3: 100, 4: 100, 5: 100}
    assert collections.Counter(r.extra["level"] for r in train) == {1: 1176, 2: 4705, 3: 4705, 4: 4705, 5: 4709}


def test_hard_split_sits_above_the_ladder_and_leaves_the_others_unchanged(splits: dict[str, list]) -> None:
    hard = splits["hard"]
    assert len({r.prompt for r in hard}) == len(hard) == 20000
    assert collections.Counter(r.extra["level"] for r in hard) == {6: 10000, 7: 10000}
    ladder_digits = max(max(lv.digits_a, lv.digits_b) for lv in LEVELS)
    for record in hard[:500]:
        a, op, b = parse_problem(record.prompt)
        level = next(lv for lv in HARD_LEVELS if lv.level == record.extra["level"])
        assert (len(str(a)), len(str(b))) == (level.digits_a, level.digits_b) and len(str(b)) > ladder_digits
        assert record.ground_truth == str(answer(a, op, b)) and record.source == "arithmetic/hard/seed0"
    # The train and test splits come from their own stream: their first rows as they were before "hard".
    assert [r.prompt for r in splits["test"][:2]] == ["What is 114 + 418?", "What is 679 + 53?"]
    assert [r.prompt for r in splits["train"][:2]] == ["What is 6614 + 5496?", "What is 618 + 384?"]


def test_records_are_consistent_with_their_level(splits: dict[str, list]) -> None:
    digits = {lv.level: (lv.digits_a, lv.digits_b) for lv in LEVELS}
    for row, record in enumerate(splits["test"]):
        a, op, b = parse_problem(record.prompt)
        assert (record.row, record.prompt_id, record.data_source) == (row, row, DATA_SOURCE)
        assert record.ground_truth == str(answer(a, op, b))
        assert int(record.ground_truth) >= 0
        assert sorted((len(str(a)), len(str(b)))) == sorted(digits[record.extra["level"]])


def test_solution_text_by_hand() -> None:
    # 47 + 38: units 7+8=15 (write 5, carry 1); tens 4+3+1=8 -> 85.
    assert solution_text("What is 47 + 38?") == "7+8=15, 4+3+1=8. \\boxed{85}"
    # 347 - 85: units 7-5=2; tens 4<8 so borrow: 14-8=6; hundreds 3-0-1=2 -> 262.
    assert solution_text("What is 347 - 85?") == "7-5=2, 14-8=6, 3-0-1=2. \\boxed{262}"
    # 105 - 98: 15-8=7, 10-9-1=0, 1-0-1=0 -> digits 007, answer 7 (leading zeros dropped).
    assert solution_text("What is 105 - 98?") == "15-8=7, 10-9-1=0, 1-0-1=0. \\boxed{7}"
    # 9999 + 1: the last column's sum 9+0+1=10 is written whole -> 10000.
    assert solution_text("What is 9999 + 1?") == "9+1=10, 9+0+1=10, 9+0+1=10, 9+0+1=10. \\boxed{10000}"


@pytest.mark.parametrize(
    "problem", ["What is 3 * 4?", "what is 3 + 4?", "What is 3 + 4", "What is 3 - 4?", "What is -3 + 4?"]
)
def test_parse_problem_rejects_other_text(problem: str) -> None:
    with pytest.raises(ValueError, match="problem="):
        parse_problem(problem)


def test_problem_text_rejects_bad_operands() -> None:
    with pytest.raises(ValueError, match="op="):
        problem_text(1, "*", 2)
    with pytest.raises(ValueError, match="a >= b"):
        problem_text(1, "-", 2)
    with pytest.raises(ValueError, match="split="):
        load_split("validation")


def test_every_solution_ends_with_its_boxed_answer(splits: dict[str, list]) -> None:
    for record in splits["train"] + splits["test"] + splits["hard"][:1000]:
        text = solution_text(record.prompt)
        assert text.endswith(f"\\boxed{{{record.ground_truth}}}"), (record.prompt, text)
        # Every column step is arithmetically true: "a+b[+1]=s" or "a-b[-1]=d".
        for step in text.split(". ")[0].split(", "):
            left, right = step.split("=")
            assert eval(left) == int(right), step  # only digits and +/- reach eval here
            assert re.fullmatch(r"\d+[+-]\d(?:[+-]1)?", left), step


def test_math_verify_accepts_the_solutions_on_a_sample(splits: dict[str, list]) -> None:
    sample = random.Random(0).sample(splits["train"] + splits["test"], 40)
    for record in sample:
        assert score_math(solution_text(record.prompt), record.ground_truth) == 1.0
        wrong = str(int(record.ground_truth) + 1)
        assert score_math(solution_text(record.prompt), wrong) == 0.0
