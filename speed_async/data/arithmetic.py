"""The embedded default task: column-wise addition and subtraction with a difficulty ladder.

A problem is "What is A + B?" or "What is A - B?" (subtraction only with A >= B, so every answer is a
non-negative integer). The level fixes the number of digits of both operands; the number of columns, carries
and borrows makes higher levels harder for a small model, which gives per-prompt pass rates that spread over
the whole range after a short warm start (easy levels always solved, the top level rarely, the middle in
between), like a real base model on a real math data set.

`solution_text` is the supervised target: one short step per column, least significant first, with the
carry or borrow written out, then the boxed answer::

    What is 347 - 85?   ->   7-5=2, 14-8=6, 3-0-1=2. \\boxed{262}

Splits are deterministic by seed and disjoint: no problem text of the "test" split appears in "train".
The "hard" split holds the rungs above the ladder (5- and 6-digit operands, `HARD_LEVELS`), which the tiny
model never sees in its warm start and never solves (0 of 1,600 samples, 100 prompts per rung x 16). Mixed
into the training data it plays the part of a real data set's problems beyond the model: prompts whose every
sample scores 0, on which plain RLOO spends full groups and SPEED only its screening samples.
No torch here: this module is imported by the data layer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from speed_async.data.records import PromptRecord

DATA_SOURCE = "arithmetic"
SPLIT_SIZES: dict[str, int] = {"train": 20000, "test": 500, "hard": 20000}


@dataclass(frozen=True)
class Level:
    """One rung of the difficulty ladder: the digit counts of the two operands."""

    level: int
    digits_a: int
    digits_b: int
    train_weight: int
    description: str


LEVELS: tuple[Level, ...] = (
    Level(1, 2, 1, 1, "2-digit +/- 1-digit (only 1800 distinct problems, hence the small train weight)"),
    Level(2, 2, 2, 4, "2-digit +/- 2-digit"),
    Level(3, 3, 2, 4, "3-digit +/- 2-digit"),
    Level(4, 3, 3, 4, "3-digit +/- 3-digit"),
    Level(5, 4, 4, 4, "4-digit +/- 4-digit"),
)

HARD_LEVELS: tuple[Level, ...] = (
    Level(6, 5, 5, 1, "5-digit +/- 5-digit (above the warm start's ladder)"),
    Level(7, 6, 6, 1, "6-digit +/- 6-digit (above the warm start's ladder)"),
)

_PROBLEM_RE = re.compile(r"^What is (\d+) ([+-]) (\d+)\?$")


def problem_text(a: int, op: str, b: int) -> str:
    """The problem statement for `a op b`, e.g. ``problem_text(47, "+", 38) == "What is 47 + 38?"``."""
    if op not in ("+", "-"):
        raise ValueError(f"op={op!r} is not allowed; allowed: '+', '-'")
    if a < 0 or b < 0 or (op == "-" and a < b):
        raise ValueError(f"operands a={a}, b={b} with op {op!r}: need a, b >= 0 and a >= b for '-'")
    return f"What is {a} {op} {b}?"


def parse_problem(problem: str) -> tuple[int, str, int]:
    """Inverse of `problem_text`: ``"What is 47 + 38?" -> (47, "+", 38)``."""
    match = _PROBLEM_RE.match(problem)
    if match is None:
        raise ValueError(
            f"problem={problem!r} is not an arithmetic problem; allowed: 'What is A + B?' or 'What is A - B?'"
        )
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    if op == "-" and a < b:
        raise ValueError(f"problem={problem!r}: subtraction needs A >= B")
    return a, op, b


def answer(a: int, op: str, b: int) -> int:
    """The exact result of `a op b`."""
    return a + b if op == "+" else a - b


def _digits(x: int, width: int) -> list[int]:
    """Least significant first, zero padded to `width`."""
    return [(x // 10**i) % 10 for i in range(width)]


def _addition_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width), strict=True):
        total = da + db + carry
        steps.append(f"{da}+{db}{'+1' if carry else ''}={total}")
        carry = total // 10
    return steps


def _subtraction_steps(a: int, b: int) -> list[str]:
    width = len(str(a))
    steps, borrow = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width), strict=True):
        need = da - borrow < db
        top = da + 10 if need else da
        steps.append(f"{top}-{db}{'-1' if borrow else ''}={top - db - borrow}")
        borrow = int(need)
    assert borrow == 0, (a, b)
    return steps


def solution_text(problem: str) -> str:
    """The supervised target response: one step per column, then ``\\boxed{answer}``.

    ``solution_text("What is 47 + 38?") == "7+8=15, 4+3+1=8. \\\\boxed{85}"``.
    """
    a, op, b = parse_problem(problem)
    steps = _addition_steps(a, b) if op == "+" else _subtraction_steps(a, b)
    return f"{', '.join(steps)}. \\boxed{{{answer(a, op, b)}}}"


def _sample_problem(rng: random.Random, level: Level) -> tuple[int, str, int]:
    a = rng.randrange(10 ** (level.digits_a - 1), 10**level.digits_a)
    b = rng.randrange(10 ** (level.digits_b - 1) if level.digits_b > 1 else 0, 10**level.digits_b)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def _sample_rows(
    rng: random.Random, levels: tuple[Level, ...], size: int, weights: list[int], seen: set[tuple[int, str, int]]
) -> list[tuple[int, str, int, int]]:
    """`size` distinct (a, op, b, level) rows not in `seen` (which they join), levels in `weights` shares."""
    per_level = [size * w // sum(weights) for w in weights]
    per_level[-1] += size - sum(per_level)
    rows: list[tuple[int, str, int, int]] = []
    for level, count in zip(levels, per_level, strict=True):
        made = 0
        while made < count:
            problem = _sample_problem(rng, level)
            if problem not in seen:
                seen.add(problem)
                rows.append((*problem, level.level))
                made += 1
    rng.shuffle(rows)
    return rows


def _generate(seed: int, split: str) -> list[tuple[int, str, int, int]]:
    """One split's (a, op, b, level) rows. Test and train come from one stream (test first, then train
    without any test text); "hard" has digit counts of its own and a stream of its own, so adding it left the
    other two splits, and the tiny model trained on them, unchanged."""
    if split == "hard":
        rng = random.Random(f"arithmetic-hard-{seed}")
        return _sample_rows(rng, HARD_LEVELS, SPLIT_SIZES["hard"], [lv.train_weight for lv in HARD_LEVELS], set())
    rng = random.Random(f"arithmetic-{seed}")
    seen: set[tuple[int, str, int]] = set()
    test = _sample_rows(rng, LEVELS, SPLIT_SIZES["test"], [1] * len(LEVELS), seen)
    if split == "test":
        return test
    return _sample_rows(rng, LEVELS, SPLIT_SIZES["train"], [lv.train_weight for lv in LEVELS], seen)


def load_split(split: str, seed: int = 0) -> list[PromptRecord]:
    """The "train" (20000), "test" (500) or "hard" (20000) split, shuffled, deterministic by `seed`.

    The test split has the levels 1..5 in equal shares, the train split in the shares `Level.train_weight`,
    the hard split the levels 6 and 7 of `HARD_LEVELS` in equal shares.

    Each record's `prompt` is the bare problem text (templates add the instruction), `ground_truth` the answer
    as a decimal string, and `extra` holds {"level": 1..7}.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split={split!r} is not allowed; allowed: {sorted(SPLIT_SIZES)}")
    rows = _generate(seed, split)
    return [
        PromptRecord(
            prompt_id=row,
            data_source=DATA_SOURCE,
            prompt=problem_text(a, op, b),
            ground_truth=str(answer(a, op, b)),
            source=f"{DATA_SOURCE}/{split}/seed{seed}",
            row=row,
            extra={"level": level},
        )
        for row, (a, op, b, level) in enumerate(rows)
    ]
