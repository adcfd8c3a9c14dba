"""The long-tail sums task: determinism, disjoint splits, long-tailed levels, targets and their lengths."""

from __future__ import annotations

import collections
import statistics

import pytest
from transformers import AutoTokenizer

from speed_async.data import arithmetic
from speed_async.data.sources import read_prompt_file
from speed_async.data.sums import LEVELS, SPLIT_SIZES, load_split, parse_problem, problem_text, solution_text
from speed_async.rewards.math_verify_reward import score_math
from speed_async.tiny.store import SHIPPED_DIR


@pytest.fixture(scope="module")
def splits() -> dict[str, list]:
    return {split: load_split(split) for split in SPLIT_SIZES}


def test_the_target_adds_every_operand_column_by_column_with_the_carry_last() -> None:
    # 47 + 38 + 96: units 7+8+6 = 21 (write 1, carry 2), tens 4+3+9+2 = 18: 181.
    assert solution_text("What is 47 + 38 + 96?") == "7+8+6=21, 4+3+9+2=18. \\boxed{181}"
    # Shorter operands take 0 in their missing columns; two operands read as the arithmetic task's addition.
    assert solution_text("What is 105 + 7?") == "5+7=12, 0+0+1=1, 1+0=1. \\boxed{112}"
    assert solution_text("What is 47 + 38?") == arithmetic.solution_text("What is 47 + 38?")
    assert parse_problem(problem_text([12, 345, 6])) == [12, 345, 6]


@pytest.mark.parametrize("bad", ["What is 1?", "What is 1 - 2?", "What is a + 2?", "1 + 2"])
def test_a_malformed_problem_is_an_error_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match="is not a sum"):
        parse_problem(bad)


def test_splits_are_deterministic_disjoint_and_long_tailed(splits: dict[str, list]) -> None:
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (20000, 500) and load_split("test") == test
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert len({r.prompt for r in train}) == len(train)
    # Shares 8:6:5:4:3:2:1:1 of 30: test 500 * 8 // 30 = 133 (+3 remainder on level 1), 100, 83, 66, 50, 33, 16, 16.
    shares = {1: 136, 2: 100, 3: 83, 4: 66, 5: 50, 6: 33, 7: 16, 8: 16}
    assert collections.Counter(r.extra["level"] for r in test) == shares
    for record in test[:200]:
        operands = parse_problem(record.prompt)
        level = LEVELS[record.extra["level"] - 1]
        assert len(operands) == level.operands and {len(str(x)) for x in operands} == {level.digits}
        assert record.ground_truth == str(sum(operands)) and record.source == "sums/test/seed0"
        assert score_math(solution_text(record.prompt), record.ground_truth) == 1.0
    with pytest.raises(ValueError, match="split='hard' is not allowed"):
        load_split("hard")


def test_response_lengths_spread_from_about_20_to_over_400_tokens(splits: dict[str, list]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_DIR))
    lengths = [len(tokenizer.encode(solution_text(r.prompt))) + 1 for r in splits["test"]]  # + the stop token
    assert min(lengths) == 20 and max(lengths) == 437
    assert statistics.median(lengths) == 39 and 70 < statistics.mean(lengths) < 73  # long-tailed: median << max


def test_builtin_source_reads_the_splits(splits: dict[str, list]) -> None:
    assert read_prompt_file("builtin:sums/test").records == splits["test"]
    with pytest.raises(ValueError, match=r"builtin:sums/nope: split='nope' is not allowed"):
        read_prompt_file("builtin:sums/nope")
