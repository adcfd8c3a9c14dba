"""The second builtin task: Countdown (as in TinyZero), whose reward is not Math-Verify.

Given 3 or 4 numbers (1 to 9 here, sized for the tiny model) and a target, write an arithmetic expression with
+ - * / and parentheses that uses each number at most once and equals the target. The reward is
`speed_async.rewards.countdown.score_countdown` (a safe parser, no `eval`), the builtin reward function of data
source ``countdown``.

Every problem is generated from a solution: the numbers in a random order, combined left to right with random
operators, every intermediate value a non-negative integer (a division only when exact) and the target in
[1, MAX_TARGET]. The levels set the count of numbers, their range and the operators; more numbers and more
operators make a problem harder for a small model, which then guesses its first operations and can work out
only the last one from the target. `solution_text` is the supervised target of the warm start: each operation
with its result, then the expression in ``<answer>`` tags::

    Use 3, 7, 5 to make 16.   ->   7*3=21, 21-5=16. <answer>(7*3)-5</answer>

A record's `ground_truth` is the target as a decimal string and `extra` holds ``{"numbers": [...], "level":
1..5, "solution": ...}``: the scorer reads the numbers from `extra`. Splits are deterministic by seed and
disjoint: no (numbers, target) pair of "test" is in "train"; "test" holds distinct problems, "train" may repeat
one (level 1 has only 550 distinct problems). No torch here: this module is imported by the data layer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from speed_async.data.records import PromptRecord

DATA_SOURCE = "countdown"
SPLIT_SIZES: dict[str, int] = {"train": 10000, "test": 500}
MAX_TARGET = 99
"""Largest target (targets are 1 .. MAX_TARGET)."""
INSTRUCTION = " Answer in <answer></answer>."
"""What `configs/tiny-cpu-countdown.toml` appends to every problem (data.prompt_suffix). Short for the tiny model,
whose tokenizer spells unseen words byte by byte (20 tokens; the rules in words took 51); a real model wants
the rules: "each number at most once, with + - * / and parentheses"."""


@dataclass(frozen=True)
class Level:
    """One rung of the ladder: how many numbers, their range, the operators of the solution."""

    level: int
    count: int
    max_number: int
    ops: str
    train_weight: int
    description: str


LEVELS: tuple[Level, ...] = (
    Level(1, 3, 9, "+-", 1, "3 numbers, + and - (550 distinct problems)"),
    Level(2, 3, 9, "+-*", 1, "3 numbers, + - * (1,860 distinct problems)"),
    Level(3, 4, 9, "+-", 2, "4 numbers, + and - (2,717 distinct problems)"),
    Level(4, 4, 9, "+-*", 3, "4 numbers, + - * (19,226 distinct problems)"),
    Level(5, 4, 9, "+-*/", 3, "4 numbers, + - * /"),
)
MAX_DRAWS_PER_PROBLEM = 1000
"""A level that needs more draws than this per problem has run out of distinct problems (an error, not a hang)."""

_PROBLEM_RE = re.compile(r"^Use (\d+(?:, \d+)*) to make (\d+)\.$")
Step = tuple[int, str, int, int]  # (left, op, right, result)


def problem_text(numbers: list[int], target: int) -> str:
    """``problem_text([3, 7, 5], 16) == "Use 3, 7, 5 to make 16."``"""
    if not numbers or any(n < 1 for n in numbers) or target < 1:
        raise ValueError(f"numbers={numbers}, target={target}: need at least one number and all >= 1")
    return f"Use {', '.join(map(str, numbers))} to make {target}."


def parse_problem(problem: str) -> tuple[list[int], int]:
    """Inverse of `problem_text`: ``"Use 3, 7, 5 to make 16." -> ([3, 7, 5], 16)``."""
    match = _PROBLEM_RE.match(problem)
    if match is None:
        raise ValueError(f"problem={problem!r} is not a countdown problem; allowed: 'Use A, B, C to make T.'")
    return [int(x) for x in match.group(1).split(", ")], int(match.group(2))


def apply(left: int, op: str, right: int) -> int | None:
    """`left op right` when it is a non-negative integer (division only when exact), else None."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right if left >= right else None
    if op == "*":
        return left * right
    if op == "/":
        return left // right if right and left % right == 0 else None
    raise ValueError(f"op={op!r} is not allowed; allowed: + - * /")


def solution_text(steps: list[Step]) -> str:
    """The supervised target: ``"7*3=21, 21-5=16. <answer>(7*3)-5</answer>"`` for the steps of a solution."""
    expression = str(steps[0][0])
    for i, (_, op, right, _) in enumerate(steps):
        expression = f"({expression}){op}{right}" if i else f"{expression}{op}{right}"
    shown = ", ".join(f"{left}{op}{right}={result}" for left, op, right, result in steps)
    return f"{shown}. <answer>{expression}</answer>"


def _sample(rng: random.Random, level: Level) -> tuple[list[int], int, list[Step]] | None:
    """One problem of `level` from a random solution (numbers shown in another random order), or None when the
    drawn solution breaks a rule (a negative or fractional intermediate, a target out of range)."""
    numbers = [rng.randint(1, level.max_number) for _ in range(level.count)]
    order = rng.sample(numbers, len(numbers))
    value, steps = order[0], []
    for right in order[1:]:
        op = rng.choice(level.ops)
        result = apply(value, op, right)
        if result is None:
            return None
        steps.append((value, op, right, result))
        value = result
    if not 1 <= value <= MAX_TARGET:
        return None
    return numbers, value, steps


def _rows(seed: int, split: str) -> list[tuple[list[int], int, list[Step], int]]:
    """(numbers, target, solution steps, level) of one split. Test first (distinct problems), then train without
    the test's (sorted numbers, target) pairs; one stream per seed."""
    rng = random.Random(f"countdown-{seed}")
    seen: set[tuple[tuple[int, ...], int]] = set()
    out: dict[str, list[tuple[list[int], int, list[Step], int]]] = {}
    for name, weights in (("test", [1] * len(LEVELS)), ("train", [lv.train_weight for lv in LEVELS])):
        size = SPLIT_SIZES[name]
        per_level = [size * w // sum(weights) for w in weights]
        per_level[-1] += size - sum(per_level)
        rows = []
        for level, count in zip(LEVELS, per_level, strict=True):
            made, draws = 0, 0
            while made < count:
                draws += 1
                if draws > MAX_DRAWS_PER_PROBLEM * count:
                    raise RuntimeError(f"countdown level {level.level} has too few distinct problems for {count}")
                drawn = _sample(rng, level)
                if drawn is None:
                    continue
                key = (tuple(sorted(drawn[0])), drawn[1])
                if key in seen:
                    continue
                if name == "test":
                    seen.add(key)
                rows.append((*drawn, level.level))
                made += 1
        rng.shuffle(rows)
        out[name] = rows
        if name == split:
            break
    return out[split]


def load_split(split: str, seed: int = 0) -> list[PromptRecord]:
    """The "train" (10000) or "test" (500) split, deterministic by `seed`: the test split has the 5 levels in
    equal shares, the train split in the shares `Level.train_weight` (1:1:2:3:3). Each record's `prompt` is the problem
    text, `ground_truth` the target, `extra` ``{"numbers": [...], "level": n, "solution": text}``."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split={split!r} is not allowed; allowed: {sorted(SPLIT_SIZES)}")
    return [
        PromptRecord(
            prompt_id=row,
            data_source=DATA_SOURCE,
            prompt=problem_text(numbers, target),
            ground_truth=str(target),
            source=f"{DATA_SOURCE}/{split}/seed{seed}",
            row=row,
            extra={"numbers": numbers, "level": level, "solution": solution_text(steps)},
        )
        for row, (numbers, target, steps, level) in enumerate(_rows(seed, split))
    ]
