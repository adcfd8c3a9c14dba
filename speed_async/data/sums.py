"""The long-tail task: multi-operand sums worked one column at a time, responses from ~20 to 400+ tokens.

A problem is "What is A + B + ... ?" with 2 to 12 operands of 2 to 14 digits. The target response is the
arithmetic task's column-by-column style (`speed_async.data.arithmetic`) with every operand's digit in each
column, least significant first, the carry written as a last term, then the boxed answer::

    What is 47 + 38 + 96?   ->   7+8+6=21, 4+3+9+2=18. \\boxed{181}

The response grows with operands x digits, so the levels (`LEVELS`) spread response lengths from about 20 tokens
(2 x 2) to over 400 (12 x 14) with the tiny model's tokenizer (one token per digit), in long-tailed shares:
most prompts are short, a few are very long, like the reasoning lengths of real RL runs. It is what
`benchmarks/long_tail.py` measures the continuous sampler on (a call that waits for its longest response leaves
the engine nearly empty through the tail) and what the `builtin:tiny-long` model is warm-started on.

Splits are deterministic by seed and disjoint ("test" first, then "train" without any test text); this module
has a random stream of its own, so the arithmetic splits and the models trained on them are untouched.
No torch here: this module is imported by the data layer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from speed_async.data.records import PromptRecord

DATA_SOURCE = "sums"
SPLIT_SIZES: dict[str, int] = {"train": 20000, "test": 500}
MAX_OPERANDS = 12
MAX_DIGITS = 14


@dataclass(frozen=True)
class Level:
    """One rung: the number of operands, their digit count, and the share of the splits."""

    level: int
    operands: int
    digits: int
    weight: int
    """Share of the train and test splits (long-tailed: short rungs are common, long ones rare)."""


LEVELS: tuple[Level, ...] = (
    Level(1, 2, 2, 8),
    Level(2, 3, 2, 6),
    Level(3, 3, 3, 5),
    Level(4, 4, 4, 4),
    Level(5, 5, 6, 3),
    Level(6, 7, 8, 2),
    Level(7, 9, 11, 1),
    Level(8, 12, 14, 1),
)

_PROBLEM_RE = re.compile(r"^What is (\d+(?: \+ \d+)+)\?$")


def problem_text(operands: list[int]) -> str:
    """``problem_text([47, 38, 96]) == "What is 47 + 38 + 96?"`` (2 to MAX_OPERANDS non-negative operands)."""
    if not 2 <= len(operands) <= MAX_OPERANDS or any(x < 0 for x in operands):
        raise ValueError(
            f"operands={operands}: need 2 to {MAX_OPERANDS} non-negative integers (got {len(operands)} operands)"
        )
    return "What is " + " + ".join(str(x) for x in operands) + "?"


def parse_problem(problem: str) -> list[int]:
    """Inverse of `problem_text`: ``"What is 47 + 38 + 96?" -> [47, 38, 96]``."""
    match = _PROBLEM_RE.match(problem)
    if match is None:
        raise ValueError(f"problem={problem!r} is not a sum; allowed: 'What is A + B + ...?' (non-negative integers)")
    return [int(x) for x in match.group(1).split(" + ")]


def solution_text(problem: str) -> str:
    """The supervised target: one step per column (every operand's digit, then the carry), then the answer.

    ``solution_text("What is 47 + 38 + 96?") == "7+8+6=21, 4+3+9+2=18. \\\\boxed{181}"``; a column where an
    operand has no digit left takes 0 for it, as the arithmetic task's subtraction does.
    """
    operands = parse_problem(problem)
    width = max(len(str(x)) for x in operands)
    steps, carry = [], 0
    for column in range(width):
        digits = [(x // 10**column) % 10 for x in operands]
        total = sum(digits) + carry
        steps.append("+".join(str(d) for d in digits) + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return f"{', '.join(steps)}. \\boxed{{{sum(operands)}}}"


def _sample(rng: random.Random, level: Level) -> tuple[int, ...]:
    low = 10 ** (level.digits - 1)
    return tuple(rng.randrange(low, 10 * low) for _ in range(level.operands))


def _rows(rng: random.Random, size: int, seen: set[tuple[int, ...]]) -> list[tuple[tuple[int, ...], int]]:
    """`size` distinct (operands, level) rows not in `seen` (which they join), levels in their weights' shares."""
    weights = [lv.weight for lv in LEVELS]
    per_level = [size * w // sum(weights) for w in weights]
    per_level[0] += size - sum(per_level)
    rows = []
    for level, count in zip(LEVELS, per_level, strict=True):
        made = 0
        while made < count:
            operands = _sample(rng, level)
            if operands not in seen:
                seen.add(operands)
                rows.append((operands, level.level))
                made += 1
    rng.shuffle(rows)
    return rows


def load_split(split: str, seed: int = 0) -> list[PromptRecord]:
    """The "train" (20000) or "test" (500) split, shuffled, deterministic by `seed`; levels in `Level.weight`
    shares. Each record's `prompt` is the bare problem, `ground_truth` the sum, `extra` {"level": 1..8}."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split={split!r} is not allowed; allowed: {sorted(SPLIT_SIZES)}")
    rng = random.Random(f"sums-{seed}")
    seen: set[tuple[int, ...]] = set()
    rows = _rows(rng, SPLIT_SIZES["test"], seen)
    if split == "train":
        rows = _rows(rng, SPLIT_SIZES["train"], seen)
    return [
        PromptRecord(
            prompt_id=row,
            data_source=DATA_SOURCE,
            prompt=problem_text(list(operands)),
            ground_truth=str(sum(operands)),
            source=f"{DATA_SOURCE}/{split}/seed{seed}",
            row=row,
            extra={"level": level},
        )
        for row, (operands, level) in enumerate(rows)
    ]
