"""The Countdown task: the safe scorer against hand-made answers, and the generated splits."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from speed_async.data.countdown import (
    DATA_SOURCE,
    LEVELS,
    MAX_TARGET,
    SPLIT_SIZES,
    load_split,
    parse_problem,
    problem_text,
    solution_text,
)
from speed_async.data.sources import read_prompt_file
from speed_async.rewards.countdown import MAX_EXPRESSION_CHARS, evaluate_expression, extract_answer, score_countdown

NUMBERS = {"numbers": [3, 7, 5, 25]}


def score(answer: str, target: str = "16", extra: dict | None = None) -> dict[str, float]:
    return score_countdown(f"7*3=21, 21-5=16. <answer>{answer}</answer>", target, extra or NUMBERS)


@pytest.mark.parametrize(
    ("answer", "target", "expected"),
    [
        ("(7*3)-5", "16", (1.0, 1.0)),  # valid: 21 - 5 = 16, three of the four numbers
        ("7*3-5", "16", (1.0, 1.0)),  # precedence: * before -
        ("25-3*3", "16", (0.0, 0.0)),  # 3 used twice, given once
        ("7+3+5", "16", (0.0, 1.0)),  # valid expression, wrong value (15)
        ("25/5+7+3", "15", (1.0, 1.0)),  # exact division: 5 + 7 + 3
        ("(25+5)/(7-3)", "7", (0.0, 1.0)),  # 30 / 4 = 7.5, not 7: no integer rounding
        ("(25+5)/(7-3)*4", "30", (0.0, 0.0)),  # 4 is not one of the numbers
        ("25/(5-5)", "16", (0.0, 0.0)),  # division by zero (and 5 reused)
        ("7/(3-3)", "16", (0.0, 0.0)),  # division by zero
        ("3**25", "16", (0.0, 0.0)),  # powers are not allowed (nor computed)
        ("25**25**25**25", "16", (0.0, 0.0)),  # a huge exponent: rejected before any arithmetic
        ("-3+25-7+1", "16", (0.0, 0.0)),  # unary minus, and 1 is not given
        ("__import__('os').system('echo hi')", "16", (0.0, 0.0)),  # garbage / code: never executed
        ("7*3-5 and 1", "16", (0.0, 0.0)),  # letters
        ("(7*3-5", "16", (0.0, 0.0)),  # does not parse
        ("", "16", (0.0, 0.0)),  # empty
        ("7.0*3-5", "16", (0.0, 0.0)),  # a float literal is not one of the numbers
        ("0x10", "16", (0.0, 0.0)),  # hexadecimal: letters
        ("((((7*3))))-5", "16", (1.0, 1.0)),  # parentheses are fine
    ],
)
def test_scorer_hand_made_cases(answer: str, target: str, expected: tuple[float, float]) -> None:
    result = score(answer, target)
    assert (result["score"], result["valid"]) == expected, (answer, result)


def test_answer_extraction_and_bounds() -> None:
    # The last <answer> wins; without tags the last \boxed{} is read; without either: 0, not an error.
    assert extract_answer("<answer>1+2</answer> then <answer>7*3-5</answer>") == "7*3-5"
    assert extract_answer("so \\boxed{7*3-5}") == "7*3-5"
    assert extract_answer("no answer here") is None
    assert score_countdown("I give up", "16", NUMBERS) == {"score": 0.0, "valid": 0.0}
    # Length bound: an expression over MAX_EXPRESSION_CHARS is not parsed at all.
    long = "+".join(["(7-7)"] * 50)
    assert len(long) > MAX_EXPRESSION_CHARS and evaluate_expression(long, [7] * 100) is None
    # Deep nesting within the bound does not crash the parser.
    assert evaluate_expression("(" * 90 + "7" + ")" * 90, [7]) == 7
    # Value bound: a product of large given numbers over 10^12 is rejected (each intermediate is checked).
    big = {"numbers": [10**7, 10**7]}
    assert score_countdown("<answer>10000000*10000000</answer>", "1", big) == {"score": 0.0, "valid": 0.0}
    # A large literal that is not given fails the number check, quickly.
    started = time.perf_counter()
    assert evaluate_expression("9" * 150, [3]) is None
    assert time.perf_counter() - started < 0.5


def test_bad_data_raises_not_scores() -> None:
    # A broken row (no numbers, a non-integer target) is a data error: the reward pool counts it as the
    # function raising, per source.
    with pytest.raises(ValueError, match=r"extra\['numbers'\] must be a non-empty list of ints"):
        score_countdown("<answer>1</answer>", "1", {})
    with pytest.raises(ValueError, match=r"invalid literal for int"):
        score_countdown("<answer>1</answer>", "sixteen", NUMBERS)


def test_problem_text_round_trip_and_solution_format() -> None:
    assert problem_text([3, 7, 5], 16) == "Use 3, 7, 5 to make 16."
    assert parse_problem("Use 3, 7, 5 to make 16.") == ([3, 7, 5], 16)
    with pytest.raises(ValueError, match=r"not a countdown problem"):
        parse_problem("What is 3 + 4?")
    steps = [(7, "*", 3, 21), (21, "-", 5, 16), (16, "+", 25, 41)]
    assert solution_text(steps) == "7*3=21, 21-5=16, 16+25=41. <answer>((7*3)-5)+25</answer>"


@pytest.fixture(scope="module")
def splits() -> dict[str, list]:
    return {split: load_split(split) for split in SPLIT_SIZES}


def test_splits_are_deterministic_disjoint_and_solved_by_their_solutions(splits: dict[str, list]) -> None:
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (10000, 500)
    assert load_split("test") == test
    key = lambda r: (tuple(sorted(r.extra["numbers"])), r.ground_truth)  # noqa: E731
    assert len({key(r) for r in test}) == len(test) and not {key(r) for r in train} & {key(r) for r in test}
    # Test: 500 / 5 levels; train: weights 1:1:2:3:3 of 10000 = 1000, 1000, 2000, 3000, 3000.
    assert collections.Counter(r.extra["level"] for r in test) == dict.fromkeys(range(1, 6), 100)
    assert collections.Counter(r.extra["level"] for r in train) == {1: 1000, 2: 1000, 3: 2000, 4: 3000, 5: 3000}
    for record in train[:2000] + test:
        level = LEVELS[record.extra["level"] - 1]
        numbers, target = parse_problem(record.prompt)
        assert numbers == record.extra["numbers"] and len(numbers) == level.count
        assert max(numbers) <= level.max_number and 1 <= target <= MAX_TARGET and record.ground_truth == str(target)
        assert score_countdown(record.extra["solution"], record.ground_truth, record.extra) == {
            "score": 1.0,
            "valid": 1.0,
        }
    assert all(r.data_source == DATA_SOURCE for r in test)


def test_builtin_source_names() -> None:
    (first, *_) = read_prompt_file("builtin:countdown/test").records
    assert first.data_source == "countdown" and first.source == "countdown/test/seed0"
    with pytest.raises(ValueError, match=r"builtin:countdown/hard: split='hard' is not allowed.*countdown/<train"):
        read_prompt_file("builtin:countdown/hard")


def test_the_countdown_config_prompts_as_the_warm_start_was_trained() -> None:
    from speed_async.config import load_config
    from speed_async.data.countdown import INSTRUCTION

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu-countdown.toml")
    assert config.data.prompt_suffix == INSTRUCTION and config.model.path == "builtin:tiny-countdown"
    assert config.data.train_files == ("builtin:countdown/train",) and config.reward.functions == {}
    assert config.data.eval_files == ("builtin:countdown/test",)
