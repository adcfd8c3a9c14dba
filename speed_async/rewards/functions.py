"""Reward functions by import path: which function scores which data source, and what a valid result is.

```
  reward.functions (config)  +  BUILTIN_FUNCTIONS      ->  {data source: "package.module:function"}
  a source named there:   function(response, ground_truth, extra) -> float | {"score": float, name: float, ...}
  any other source:       Math-Verify (RewardPool's default score_fn, called with (response, ground_truth))
```
Functions run inside the reward worker processes (`speed_async.rewards.pool`), under the same per-item time
limit as Math-Verify. `check_result` turns what a function returned into (score, metrics) or raises
`InvalidReward`: a non-number (a bool counts as 1 or 0), NaN or infinity, a dict without a numeric `score`, or
a metric that is not a finite number or has a reserved name. `check_functions` imports each configured path in
the launcher, before any process starts, so that a path that does not resolve is a config error naming it.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

BUILTIN_FUNCTIONS: dict[str, str] = {"countdown": "speed_async.rewards.countdown:score_countdown"}
"""Data sources with a reward of their own when reward.functions does not name them."""
RESERVED_METRICS = frozenset({"score", "score_mean", "responses", "failed"})
"""Names a function's extra metrics may not take (they are the per-source counters' names)."""
FAILURE_KINDS = ("error", "invalid", "timeout")
"""How a function can fail an item: it raised (or its worker died), returned something that is not a valid
result, or ran past the time limit. Each scores 0 and is counted per source."""


class InvalidReward(ValueError):
    """A reward function returned something that is not a valid result (the message says what)."""


def effective_functions(configured: Mapping[str, str]) -> dict[str, str]:
    """The function of every source that has one: the builtin ones, overridden by `configured`."""
    return {**BUILTIN_FUNCTIONS, **configured}


def load_function(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function; ValueError saying what failed."""
    module_name, colon, attr = path.partition(":")
    if not (module_name and colon and attr):
        raise ValueError(f"{path!r} is not 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an import runs arbitrary code: any failure means the path does not resolve
        raise ValueError(f"module {module_name!r} cannot be imported ({type(err).__name__}: {err})") from err
    function = getattr(module, attr, None)
    if function is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(function):
        raise ValueError(f"{path!r} is a {type(function).__name__}, not a function")
    return function


def check_functions(configured: Mapping[str, str], sources: Iterable[str] | None = None) -> None:
    """Import every configured function as the workers will (the working directory first on the path, as for
    `python -m`); ValueError naming the key and path of the first that does not resolve, or of a source that
    is none of `sources` (the run's data sources) when they are given."""
    known = sorted(set(sources)) if sources is not None else None
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        for source, path in configured.items():
            key = f"reward.functions.{source}"
            if known is not None and source not in known:
                raise ValueError(
                    f"{key} = {path!r} is invalid: no data source {source!r} in the run (sources: {known})"
                )
            try:
                load_function(path)
            except ValueError as err:
                raise ValueError(f"{key} = {path!r} is invalid: {err}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _number(value: Any, what: str) -> float:
    if not isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        raise InvalidReward(f"{what} is a {type(value).__name__} ({value!r:.60}), not a number")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidReward(f"{what} is {number}, not a finite number")
    return number


def check_result(value: Any) -> tuple[float, dict[str, float]]:
    """(score, extra metrics) of a function's return value: a finite number, or a dict with a finite numeric
    `score` and finite numeric extra metrics under names that are non-empty strings and not RESERVED_METRICS.
    InvalidReward otherwise."""
    if not isinstance(value, Mapping):
        return _number(value, "the result"), {}
    if "score" not in value:
        raise InvalidReward(f"the result dict has no 'score' (keys: {sorted(map(str, value))[:8]})")
    metrics = {}
    for name, metric in value.items():
        if name == "score":
            continue
        if not isinstance(name, str) or not name or name in RESERVED_METRICS:
            raise InvalidReward(f"metric name {name!r} is not allowed (a non-empty string, not one of "
                                f"{sorted(RESERVED_METRICS)})")  # fmt: skip
        metrics[name] = _number(metric, f"metric {name!r}")
    return _number(value["score"], "'score'"), metrics
