"""The Countdown reward: does the answer's expression use the given numbers at most once each and hit the target?

The expression is parsed with `ast` into a tree and evaluated by walking it: only integer literals, + - * /
and parentheses are accepted (no unary minus, no powers, no names, calls or anything else), with exact
fractions, so nothing in a response is ever executed. It is bounded: an answer over `MAX_EXPRESSION_CHARS`
characters, an intermediate value over `MAX_ABS_VALUE` in magnitude, a division by zero, a number that is not
one of the given ones (or is used more often than given) and anything that does not parse all score 0.

This is the builtin reward function of data source ``countdown`` (`speed_async.rewards.functions`); it runs
in the reward worker processes like any user function: ``(response, ground_truth, extra)`` with the target as
`ground_truth` and the numbers in ``extra["numbers"]``.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

MAX_EXPRESSION_CHARS = 200
"""Longest answer expression that is parsed at all."""
MAX_ABS_VALUE = 10**12
"""Largest magnitude of any intermediate value."""

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_ALLOWED_CHARS = re.compile(r"^[0-9+\-*/()\s]+$")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class _Invalid(Exception):
    """The expression breaks a rule: it scores 0."""


def extract_answer(response: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` of `response`, else of its last ``\\boxed{...}``, else
    None."""
    found = _ANSWER_RE.findall(response) or _BOXED_RE.findall(response)
    return found[-1].strip() if found else None


def evaluate_expression(expression: str, numbers: list[int]) -> Fraction | None:
    """The exact value of `expression` if it is a valid Countdown expression over `numbers` (each used at most
    once), else None."""
    if len(expression) > MAX_EXPRESSION_CHARS or not _ALLOWED_CHARS.match(expression):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used: list[int] = []
    try:
        value = _value(tree.body, used)
    except (_Invalid, RecursionError):
        return None
    if Counter(used) - Counter(numbers):  # a number not given, or used more often than given
        return None
    return value


def _value(node: ast.expr, used: list[int]) -> Fraction:
    """Walk the tree: integer literals and + - * / only; every value bounded by MAX_ABS_VALUE."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        value = Fraction(node.value)
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left, used), _value(node.right, used)
        op = _OPS[type(node.op)]
        if op == "/" and right == 0:
            raise _Invalid("division by zero")
        value = (
            left + right if op == "+" else left - right if op == "-" else left * right if op == "*" else left / right
        )
    else:
        raise _Invalid(f"{type(node).__name__} is not allowed")
    if abs(value) > MAX_ABS_VALUE:
        raise _Invalid("value out of bounds")
    return value


def _numbers(extra: Mapping[str, Any]) -> list[int]:
    numbers = extra.get("numbers")
    if not isinstance(numbers, list) or not numbers or not all(type(n) is int for n in numbers):
        raise ValueError(f"extra['numbers'] must be a non-empty list of ints (the row's numbers), got {numbers!r:.80}")
    return numbers


def score_countdown(response: str, ground_truth: str, extra: Mapping[str, Any]) -> dict[str, float]:
    """``{"score": 1.0 if the answer's expression equals the target else 0.0, "valid": 1.0 if the answer is a
    well-formed expression over the given numbers else 0.0}``.

    `ground_truth` is the target (an integer string); ``extra["numbers"]`` the given numbers. A ground truth or
    numbers that are not so raise ValueError (bad data, not a bad response).
    """
    target = int(ground_truth)
    numbers = _numbers(extra)
    expression = extract_answer(response)
    value = evaluate_expression(expression, numbers) if expression is not None else None
    if value is None:
        return {"score": 0.0, "valid": 0.0}
    return {"score": 1.0 if value == target else 0.0, "valid": 1.0}
